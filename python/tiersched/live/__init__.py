"""Everything that talks to a running SGLang server: request sets, the HTTP driver, A/B arms and runs, load runs,
replay of recorded runs in the simulator, reports, and the cpu-tiny calibration and fidelity checks."""
