"""Zero-shot evaluation: top-k counting, prompt-ensembled text classifier, accuracy over batches."""

import pytest
import torch
import torch.nn.functional as F

from p4q_engine.errors import ConfigError
from p4q_engine.eval.zeroshot import evaluate, prompt_texts, text_classifier, topk_correct


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- topk_correct
def test_topk_correct_hand_made():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # ranks: 0, 1, 2, 3
            [0.1, 0.2, 0.3, 0.4],  # ranks: 3, 2, 1, 0
            [0.5, 0.0, 0.7, 0.6],  # ranks: 2, 3, 0, 1
            [0.0, 1.0, -1.0, 0.5],  # ranks: 1, 3, 0, 2
        ]
    )
    labels = torch.tensor([0, 1, 1, 2])
    # sample 0: label top-1; sample 1: label rank 3 (top-3); sample 2: label 1 is last (rank 4); sample 3: rank 4
    assert topk_correct(logits, labels, ks=(1, 2, 3, 4)) == {1: 1, 2: 1, 3: 2, 4: 4}


def test_topk_correct_caps_k_at_number_of_classes():
    logits = torch.tensor([[0.2, 0.8, 0.1], [0.3, 0.1, 0.6]])
    labels = torch.tensor([2, 1])
    assert topk_correct(logits, labels, ks=(1, 5)) == {1: 0, 5: 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_correct_matches_rank_computation(seed):
    g = _gen(seed)
    logits = torch.randn(64, 10, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    # rank of the label = number of logits strictly larger than the label's
    rank = (logits > logits[torch.arange(64), labels][:, None]).sum(1)
    ks = (1, 3, 5, 10)
    expected = {k: int((rank < k).sum()) for k in ks}
    assert topk_correct(logits, labels, ks) == expected
    assert expected[10] == 64


# ----------------------------------------------------------------------------------------------- text classifier
CLASSES = ["cat", "dog", "car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{} in the wild"]


def test_prompt_texts_class_major():
    texts = prompt_texts(CLASSES, TEMPLATES)
    assert len(texts) == 12
    assert texts[0] == "a photo of a cat." and texts[2] == "cat in the wild" and texts[3] == "a photo of a dog."
    with pytest.raises(ConfigError):
        prompt_texts([], TEMPLATES)
    with pytest.raises(ConfigError):
        prompt_texts(CLASSES, [])


class _FakeText:
    """Tokenizer mapping each distinct string to an id, and an encoder looking ids up in a random table."""

    def __init__(self, dim: int = 6, seed: int = 3):
        texts = prompt_texts(CLASSES, TEMPLATES)
        self.ids = {t: i for i, t in enumerate(sorted(texts))}  # ids independent of class-major order
        self.table = torch.randn(len(texts), dim, generator=_gen(seed)) * torch.linspace(0.5, 5, len(texts))[:, None]
        self.calls = []

    def tokenizer(self, texts):
        return torch.tensor([[self.ids[t], 7] for t in texts])

    def encode(self, tokens):
        self.calls.append(tokens.shape[0])
        return self.table[tokens[:, 0]]


@pytest.mark.parametrize("batch_size", [1, 5, 256])
def test_text_classifier_is_normalised_mean_of_normalised(batch_size):
    fake = _FakeText()
    cls = text_classifier(fake.encode, fake.tokenizer, CLASSES, TEMPLATES, batch_size=batch_size)
    assert cls.shape == (len(CLASSES), fake.table.shape[1])
    torch.testing.assert_close(cls.norm(dim=1), torch.ones(len(CLASSES)), rtol=0, atol=1e-6)
    assert sum(fake.calls) == 12 and max(fake.calls) <= batch_size
    for c, name in enumerate(CLASSES):
        rows = [fake.table[fake.ids[t.format(name)]] for t in TEMPLATES]
        mean = sum(r / r.norm() for r in rows) / len(rows)
        torch.testing.assert_close(cls[c], mean / mean.norm(), rtol=0, atol=1e-6)


def test_text_classifier_differs_from_unnormalised_mean():
    # Guard: template norms differ by up to 10x, so normalising before averaging matters.
    fake = _FakeText()
    cls = text_classifier(fake.encode, fake.tokenizer, CLASSES, TEMPLATES)
    rows = torch.stack([fake.table[fake.ids[t.format(CLASSES[0])]] for t in TEMPLATES])
    assert not torch.allclose(cls[0], F.normalize(rows.mean(0), dim=0), atol=1e-3)


# ----------------------------------------------------------------------------------------------- evaluate
def _separable_problem(seed: int, n_classes: int = 7, dim: int = 16, per_class: int = 9):
    g = _gen(seed)
    classifier = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    # images are features: class embedding x random positive scale + small noise
    scale = torch.rand(labels.numel(), 1, generator=g) * 3 + 0.5
    feats = classifier[labels] * scale + 0.01 * torch.randn(labels.numel(), dim, generator=g)
    return classifier, feats, labels


def _batches(feats, labels, bs):
    return list(zip(feats.split(bs), labels.split(bs)))


@pytest.mark.parametrize("bs", [1, 4, 100])
def test_evaluate_separable_is_perfect(bs):
    classifier, feats, labels = _separable_problem(5)
    out = evaluate(lambda x: x, classifier, _batches(feats, labels, bs), ks=(1, 5))
    assert out == {"top1": 100.0, "top5": 100.0, "n": labels.numel()}


@pytest.mark.parametrize("seed", [6, 7])
def test_evaluate_permuted_labels_hand_computed(seed):
    classifier, feats, labels = _separable_problem(seed)
    n_classes = classifier.shape[0]
    perm = torch.randperm(n_classes, generator=_gen(seed + 100))
    assert not torch.equal(perm, torch.arange(n_classes))
    wrong = perm[labels]
    # The model still predicts the true class; only those whose label is a fixed point of perm stay correct.
    expected_top1 = 100.0 * float((perm[labels] == labels).float().mean())
    # top-2: correct if the permuted label is the true class or the second closest class embedding.
    sims = F.normalize(feats, dim=-1) @ classifier.T
    second = sims.topk(2, dim=1).indices[:, 1]
    expected_top2 = 100.0 * float(((wrong == labels) | (wrong == second)).float().mean())
    out = evaluate(lambda x: x * 2.0, classifier, _batches(feats, wrong, 10), ks=(1, 2))
    assert out["n"] == labels.numel()
    assert out["top1"] == pytest.approx(expected_top1)
    assert out["top2"] == pytest.approx(expected_top2)
    assert out["top1"] < 100.0


def test_evaluate_uses_encoder_output_not_raw_input():
    classifier, feats, labels = _separable_problem(8)
    # An encoder that maps every image to class 0's embedding: top-1 = share of class-0 samples.
    out = evaluate(lambda x: classifier[:1].expand(x.shape[0], -1), classifier, _batches(feats, labels, 16), ks=(1,))
    assert out["top1"] == pytest.approx(100.0 * float((labels == 0).float().mean()))


def test_evaluate_without_images_raises():
    classifier = torch.eye(3)
    with pytest.raises(ConfigError):
        evaluate(lambda x: x, classifier, [], ks=(1,))
