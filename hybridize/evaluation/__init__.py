"""`hybridize eval`: how good is a hybrid? Fidelity to its teacher (`fidelity`), accuracy on local tasks
(`tasks`), and an lmms-eval model for standard benchmarks (`lmms_eval_model`, the `eval` extra)."""


def default_placement(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype) an evaluation runs on when not given: CUDA in bf16 where there is a GPU, else CPU in fp32."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
