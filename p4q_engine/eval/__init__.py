"""Zero-shot evaluation."""

from p4q_engine.eval.zeroshot import evaluate, prompt_texts, text_classifier, topk_correct

__all__ = ["evaluate", "prompt_texts", "text_classifier", "topk_correct"]
