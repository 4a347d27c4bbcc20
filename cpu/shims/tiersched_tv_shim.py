"""Make the registry's torchvision wheel importable on a CPU-only torch.

The only torchvision 0.28.0 wheel on the registry is built against CUDA: its `_C` extension fails to load
on CPU torch, and then `torchvision/_meta_registrations.py` registers fake kernels for `torchvision::nms`
and `torchvision::qnms`, which raises "operator torchvision::nms does not exist". Defining those two
schemas before torchvision's first import lets the import succeed (the ops themselves stay unavailable,
and SGLang never calls them). Loaded at interpreter start from a .pth file, because SGLang's spawned
scheduler processes import torchvision while unpickling, before any plugin runs.
"""
import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_keepalive = []  # a torch.library.Library drops its definitions when garbage-collected


class _DefineSchemasFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            try:
                lib.define(schema)
            except RuntimeError:  # a working _C already defined it
                pass
        _keepalive.append(lib)
        return None  # the normal finders import torchvision itself


sys.meta_path.insert(0, _DefineSchemasFirst())
