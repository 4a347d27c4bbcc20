"""Per-deployment fit of the step planner's `RooflineStepModel` from the server's own measured steps.

The planner (step_plan.py) prices candidate steps with a `StepTimeModel`. A deployment starts from a prior (the
simulator's model of it) and replaces it by a fit to its own step timings once it has enough of them:

    minimise  sum_n (pred_n(theta) / measured_n - 1)^2  +  ridge * sum_j ((theta_j - prior_j) / s_j)^2

a relative-error least squares over the measured steps plus a ridge pull towards the prior (s_j: the prior's
value, or for a parameter the prior sets to 0, the data's own scale of it), so a parameter the samples barely
constrain (e.g. the prefill slope when only decode steps were seen) stays near the prior, and with many samples
the data decide (`ridge` = 0.1: the prior weighs, per parameter, as a tenth of a step mispredicted by 100%). As in `fit_roofline`, the model is linear in theta once each step's slowest rank and each
max's regime (floor or slope) are fixed; the fit alternates between taking those from the current theta and
solving the augmented least squares (numpy lstsq), clipped at 0. Deterministic.

`StepSamples` keeps the last `capacity` measured steps (features [R] per step, seconds) for the fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tiersched.core.request.step_plan import ROOFLINE_PARAMS, RooflineStepModel, roofline_design


def fit_step_model(prefill_tokens, prefill_pairs, decode_count, decode_context, measured_s,
                   prior: RooflineStepModel, ridge: float = 0.1, iterations: int = 20) -> RooflineStepModel:
    """Ridge-to-prior fit (module docstring) of measured steps: feature arrays [N, R] (a prefilling rank's decode
    columns are ignored: without mixed chunking it does not decode), measured_s [N] > 0. Returns a model."""
    x = [np.asarray(a, dtype=float) for a in (prefill_tokens, prefill_pairs, decode_count, decode_context)]
    y = np.asarray(measured_s, dtype=float)
    if y.ndim != 1 or y.size == 0 or any(a.ndim != 2 or a.shape[0] != y.size or a.shape != x[0].shape for a in x):
        raise ValueError(f"fit_step_model needs [N, R] feature arrays and [N] measured times with N >= 1, got "
                         f"shapes {[a.shape for a in x]} and {y.shape}.")
    if not (np.all(np.isfinite(y)) and np.all(y > 0)):
        raise ValueError("fit_step_model needs finite measured step times > 0.")
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}.")
    pt, pp, dc, dx = x
    tok = np.where(pt > 0, pt, dc)
    ctx = np.where(pt > 0, 0.0, dx)
    pp = np.where(pt > 0, pp, 0.0)
    total = tok.sum(axis=1)
    prior_theta = np.array([getattr(prior, k) for k in ROOFLINE_PARAMS], dtype=float)
    scale = 1.0 / y
    model = prior
    for _ in range(iterations):
        a = roofline_design(model, tok, pp, ctx, total)
        # s_j: the prior's value; for a parameter the prior has at 0, the value that would explain the median
        # step by itself where that feature is present (so the pull is on the data's own scale).
        data_scale = np.array([np.median(y[col > 0] / col[col > 0]) if np.any(col > 0) else 1.0 for col in a.T])
        s = np.where(prior_theta > 0, prior_theta, data_scale)
        w = np.sqrt(ridge) / s
        lhs = np.vstack([a * scale[:, None], np.diag(w)])
        rhs = np.concatenate([y * scale, w * prior_theta])
        theta, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
        new = RooflineStepModel(*np.maximum(theta, 0.0).tolist())
        if new == model:
            break
        model = new
    return model


def scale_to_steps(model: RooflineStepModel, prefill_tokens, prefill_pairs, decode_count, decode_context,
                   measured_s) -> RooflineStepModel:
    """`model` with every parameter multiplied by the median of measured / predicted over the given steps: the
    one-parameter fit a deployment can make from a handful of steps, before there are enough for
    `fit_step_model` (a prior from another machine, or the same machine under a different load, is off by a
    common factor far more than in its shape). Steps the model prices at 0 are left out; none left: unchanged."""
    pred = model.batch_seconds(*(np.asarray(a, dtype=float) for a in (prefill_tokens, prefill_pairs, decode_count,
                                                                       decode_context)))
    y = np.asarray(measured_s, dtype=float)
    ok = (pred > 0) & (y > 0) & np.isfinite(y)
    if not ok.any():
        return model
    factor = float(np.median(y[ok] / pred[ok]))
    return RooflineStepModel(**{k: getattr(model, k) * factor for k in ROOFLINE_PARAMS})


def relative_errors(model: RooflineStepModel, prefill_tokens, prefill_pairs, decode_count, decode_context,
                    measured_s) -> np.ndarray:
    """predicted / measured - 1 per step ([N]), with the prefilling ranks' decode columns zeroed as in the fit."""
    pt = np.asarray(prefill_tokens, dtype=float)
    dc = np.where(pt > 0, 0.0, np.asarray(decode_count, dtype=float))
    dx = np.where(pt > 0, 0.0, np.asarray(decode_context, dtype=float))
    pred = model.batch_seconds(pt, np.asarray(prefill_pairs, dtype=float), dc, dx)
    return pred / np.asarray(measured_s, dtype=float) - 1.0


@dataclass
class StepSamples:
    """The last `capacity` measured lockstep steps of a group of `ranks` ranks (a ring buffer)."""

    ranks: int
    capacity: int = 4096
    _x: np.ndarray = field(init=False, repr=False)
    _y: np.ndarray = field(init=False, repr=False)
    _n: int = field(default=0, init=False)  # samples ever added

    def __post_init__(self) -> None:
        if self.ranks < 1 or self.capacity < 1:
            raise ValueError(f"StepSamples needs ranks >= 1 and capacity >= 1, got {self.ranks}, {self.capacity}.")
        self._x = np.zeros((self.capacity, 4, self.ranks))
        self._y = np.zeros(self.capacity)

    def add(self, prefill_tokens, prefill_pairs, decode_count, decode_context, measured_s: float) -> bool:
        """Record one step (arrays [R]); an idle step (no work anywhere) or a non-positive time is not a sample.
        Returns whether it was recorded."""
        row = np.array([prefill_tokens, prefill_pairs, decode_count, decode_context], dtype=float)
        if row.shape != (4, self.ranks):
            raise ValueError(f"a step sample needs 4 arrays of {self.ranks} ranks, got shape {row.shape}.")
        if not (measured_s > 0 and np.isfinite(measured_s)) or not (row[0].any() or row[2].any()):
            return False
        i = self._n % self.capacity
        self._x[i], self._y[i] = row, measured_s
        self._n += 1
        return True

    @property
    def added(self) -> int:
        return self._n

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(prefill_tokens, prefill_pairs, decode_count, decode_context) [N, R] and measured seconds [N], oldest
        first."""
        n = len(self)
        order = (np.arange(n) + (self._n - n)) % self.capacity
        x = self._x[order]
        return x[:, 0], x[:, 1], x[:, 2], x[:, 3], self._y[order]

    def fit(self, prior: RooflineStepModel, ridge: float = 0.1) -> RooflineStepModel:
        return fit_step_model(*self.arrays(), prior=prior, ridge=ridge)
