"""The paper's few-shot fine-tuning comparators (Co-Reg paper, §IV-A/C, Tables I-II): k labelled
images per class, k in {1, 2, 4, 8, 16}.

- `coreg_ray.fewshot.coop`: CoOp prompt learning for the CLIP annotators (ViT-B/32, ViT-B/16),
  open_clip, main environment (``coreg-ray[clip]``);
- `coreg_ray.fewshot.lora`: LoRA fine-tuning of the LLaVA-1.5 annotator with transformers +
  peft, in the separate vLLM environment (``.ci/vllm-env.sh`` installs peft there;
  elsewhere ``pip install 'coreg-ray[lora]'``).

Both are imported lazily: `run_fewshot` dispatches by name without importing the other's
dependencies.
"""
from __future__ import annotations

PAPER_SHOTS = (1, 2, 4, 8, 16)
METHODS = ("coop", "lora")


def run_fewshot(method: str, model: str, train_table, test_table, shots=PAPER_SHOTS,
                seeds=(1, 2, 3), **kwargs) -> list[dict]:
    """One few-shot comparator over shots x seeds -> one result row per run.

    method "coop": model is a ``clip:MODEL[/PRETRAINED]`` spec (`coop.run_coop_sweep`);
    method "lora": model is a LLaVA folder or ``llava:PATH`` (`lora.run_lora_sweep`).
    """
    from coreg_ray.errors import CoregError

    m = str(method).lower()
    if m == "coop":
        from coreg_ray.fewshot.coop import run_coop_sweep
        return run_coop_sweep(model, train_table, test_table, shots, seeds, **kwargs)
    if m == "lora":
        from coreg_ray.fewshot.lora import run_lora_sweep
        return run_lora_sweep(model, train_table, test_table, shots, seeds, **kwargs)
    raise CoregError(f"few-shot method {method!r}: use one of {', '.join(METHODS)}")


__all__ = ["METHODS", "PAPER_SHOTS", "run_fewshot"]
