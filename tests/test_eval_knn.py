"""k-NN classification against a brute-force reference written from the DINO formula (exp(sim / T) votes)."""

from __future__ import annotations

import pytest
import torch

from evaluation.knn import few_shot_indices, knn_classify, knn_evaluate, knn_evaluate_report, knn_scores


def clustered(n: int, num_classes: int, dim: int, seed: int, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy points around one random centre per class: neighbours are informative but not perfect."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def reference_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int, temperature: float,
                     num_classes: int) -> torch.Tensor:
    """Per test sample: cosine similarity to every train sample in float64, the k largest, exp(sim / T) votes,
    normalised to sum to 1 (DINOv2's softmax form)."""
    out = torch.zeros(len(test), num_classes, dtype=torch.float64)
    train64, test64 = train.double(), test.double()
    for i, q in enumerate(test64):
        sims = (train64 @ q) / (train64.norm(dim=1) * q.norm())
        order = sorted(range(len(train)), key=lambda j: -sims[j].item())[:k]
        for j in order:
            out[i, train_labels[j]] += torch.exp(sims[j] / temperature)
        out[i] /= out[i].sum()
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    train, train_labels = clustered(103, 6, 16, seed=0)
    test, test_labels = clustered(37, 6, 16, seed=1)
    return {"train": train * torch.rand(103, 1) * 3 + 0.1, "train_labels": train_labels, "test": test,
            "test_labels": test_labels}  # rescaled rows: cosine similarity must not depend on norms


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (103, 0.07)])
def test_knn_classify_equals_brute_force_reference(data, k, temperature):
    ref = reference_scores(data["train"], data["train_labels"], data["test"], k, temperature, 6)
    pred = knn_classify(data["train"], data["train_labels"], data["test"], k=k, temperature=temperature)
    assert pred.dtype == torch.long and pred.shape == (37,)
    assert torch.equal(pred, ref.argmax(dim=1))
    scores = knn_scores(data["train"], data["train_labels"], data["test"], [k], temperature, num_classes=6)[k]
    torch.testing.assert_close(scores.double(), ref, atol=1e-5, rtol=1e-4)


def test_chunked_search_equals_one_chunk(data):
    """Train and test streamed in chunks far smaller than the sets (and not dividing them) change nothing."""
    whole = knn_scores(data["train"], data["train_labels"], data["test"], [1, 10, 50], num_classes=6)
    chunked = knn_scores(data["train"], data["train_labels"], data["test"], [1, 10, 50], num_classes=6,
                         train_chunk_size=7, test_chunk_size=5)
    for k in (1, 10, 50):
        torch.testing.assert_close(chunked[k], whole[k])


def test_knn_evaluate_top1_top5_match_reference(data):
    metrics = knn_evaluate(data["train"], data["train_labels"], data["test"], data["test_labels"], ks=(10, 20),
                           train_chunk_size=16)
    for k in (10, 20):
        ref = reference_scores(data["train"], data["train_labels"], data["test"], k, 0.07, 6)
        top = ref.topk(5, dim=1).indices
        top1 = 100.0 * (top[:, 0] == data["test_labels"]).double().mean().item()
        top5 = 100.0 * (top == data["test_labels"][:, None]).any(dim=1).double().mean().item()
        assert metrics[f"top1_k{k}"] == pytest.approx(top1)
        assert metrics[f"top5_k{k}"] == pytest.approx(top5)
    # The clusters overlap (spread 1.5) yet neighbours carry the label: well above the 1/6 chance level.
    assert metrics["top1_k20"] > 50.0


def test_few_shot_indices_take_n_per_class_and_depend_on_seed():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = few_shot_indices(labels, 4, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [4, 3, 4]  # class 1 has only 3: all of them
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, few_shot_indices(labels, 4, seed=0))
    assert not torch.equal(idx, few_shot_indices(labels, 4, seed=1))


def test_few_shot_results_average_the_tries(data):
    report = knn_evaluate_report(data["train"], data["train_labels"], data["test"], data["test_labels"],
                                 ks=(1, 10, 20), n_per_class=[2], n_tries=3, seed=5)
    # 2 per class x 6 classes = 12 train samples: k=20 cannot run and says so.
    assert report["skipped"] == [{"train": "2shot", "k": 20, "reason": "k > 12 train samples"}]
    for k in (1, 10):
        per_try = []
        for t in range(3):
            idx = few_shot_indices(data["train_labels"], 2, seed=5 + t)
            pred = knn_classify(data["train"][idx], data["train_labels"][idx], data["test"], k=k, num_classes=6)
            per_try.append(100.0 * (pred == data["test_labels"]).double().mean().item())
        assert report["metrics"][f"2shot_top1_k{k}"] == pytest.approx(sum(per_try) / 3)
    rows = [r for r in report["rows"] if r["train"] == "2shot"]
    assert [(r["k"], r["tries"]) for r in rows] == [(1, 3), (10, 3)]


def test_k_larger_than_train_set_is_skipped_with_a_reason_not_silently(data):
    report = knn_evaluate_report(data["train"][:15], data["train_labels"][:15], data["test"], data["test_labels"],
                                 ks=(10, 20))
    assert "top1_k10" in report["metrics"] and "top1_k20" not in report["metrics"]
    assert report["skipped"] == [{"train": "full", "k": 20, "reason": "k > 15 train samples"}]


def test_bad_inputs_raise_clear_errors(data):
    with pytest.raises(ValueError, match="every k must be in"):
        knn_classify(data["train"], data["train_labels"], data["test"], k=104)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(data["train"], data["train_labels"], data["test"], temperature=0.0)
    with pytest.raises(ValueError, match="16-d but test features 8-d"):
        knn_classify(data["train"], data["train_labels"], data["test"][:, :8])
    with pytest.raises(ValueError, match="train labels"):
        knn_classify(data["train"], data["train_labels"][:5], data["test"])
