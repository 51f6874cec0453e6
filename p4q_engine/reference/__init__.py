"""The embedded reference task: closed-vocabulary tokenizer, the tiny "P4Q-Ref-Tiny" open_clip CLIP, and its
training script. See ``docs/reference_task.md``."""

from p4q_engine.reference.tokenizer import ReferenceTokenizer

__all__ = ["ReferenceTokenizer", "REFERENCE_MODEL_NAME", "load_reference_model", "register_reference_config"]

REFERENCE_MODEL_NAME = "P4Q-Ref-Tiny"


def __getattr__(name):  # lazy: importing the tokenizer must not pull in open_clip
    if name in ("load_reference_model", "register_reference_config", "build_reference_model"):
        from p4q_engine.reference import model

        return getattr(model, name)
    raise AttributeError(name)
