"""`hybridize eval`: how good is a hybrid? Fidelity to its teacher (`fidelity`), accuracy on local tasks
(`tasks`), and an lmms-eval model for standard benchmarks (`lmms_eval_model`, the `eval` extra)."""
