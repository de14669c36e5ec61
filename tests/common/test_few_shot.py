import pytest

from common.few_shot import sample_support
from common.utils import UserError


def _meta(n_train=10):
    train = [{"img_path": f"a/train/good/{i:03d}.png", "mask_path": "", "cls_name": "a", "specie_name": "good",
              "anomaly": 0} for i in range(n_train)]
    test = [{"img_path": f"a/test/good/{i:03d}.png", "mask_path": "", "cls_name": "a", "specie_name": "good",
             "anomaly": 0} for i in range(5)]
    return {"train": {"a": train, "b": list(train)}, "test": {"a": test}}


def test_same_seed_same_support_and_different_seed_differs():
    meta = _meta()
    assert sample_support(meta, "a", 4, seed=3) == sample_support(meta, "a", 4, seed=3)
    draws = {tuple(sample_support(meta, "a", 4, seed=s)) for s in range(10)}
    assert len(draws) > 5


def test_without_replacement_from_train_normals_only():
    meta = _meta()
    for seed in range(20):
        chosen = sample_support(meta, "a", 10, seed)
        assert len(set(chosen)) == 10
        assert all("/train/good/" in p for p in chosen)


def test_draw_does_not_depend_on_other_classes_and_extra_draw_differs():
    meta = _meta()
    alone = sample_support(meta, "a", 3, seed=0)
    sample_support(meta, "b", 3, seed=0)
    assert sample_support(meta, "a", 3, seed=0) == alone
    assert sample_support(meta, "a", 3, seed=0, draw=1) != alone or sample_support(meta, "a", 3, 1, draw=1) != \
        sample_support(meta, "a", 3, 1)


def test_errors():
    meta = _meta(n_train=3)
    with pytest.raises(UserError, match="larger than"):
        sample_support(meta, "a", 4, 0)
    with pytest.raises(UserError, match="at least 1"):
        sample_support(meta, "a", 0, 0)
    with pytest.raises(UserError, match="no train split"):
        sample_support(meta, "zzz", 1, 0)
    assert len(sample_support(meta, "a", 5, 0, replacement=True)) == 5
