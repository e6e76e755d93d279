"""DetectionDataset: targets with contiguous labels, crowd and degenerate boxes dropped."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from detkd.data.coco import load_coco
from detkd.data.dataset import DetectionDataset, collate_detection
from detkd.data.records import DatasetError
from detkd.data.transforms import ScaleBy


@pytest.fixture
def source(coco_set):
    return load_coco(coco_set.ann_path, coco_set.images_dir)


def _by_image_id(dataset: DetectionDataset) -> dict[int, tuple[torch.Tensor, dict]]:
    return {dataset.source.records[i].image_id: dataset[i] for i in range(len(dataset))}


@pytest.mark.parametrize("train", [True, False])
def test_crowd_boxes_are_dropped_from_targets(source, train: bool) -> None:
    items = _by_image_id(DetectionDataset(source, train=train))
    _, target = items[2]  # image 2: one bird box and one crowd region
    assert torch.equal(target["boxes"], torch.tensor([[5.0, 5.0, 15.0, 15.0]]))
    assert torch.equal(target["labels"], torch.tensor([3]))
    # still in the COCO ground truth used for evaluation
    crowd = [a for a in source.to_coco_dict()["annotations"] if a["iscrowd"]]
    assert [a["id"] for a in crowd] == [4]


def test_labels_are_contiguous_for_sparse_category_ids(source) -> None:
    items = _by_image_id(DetectionDataset(source, train=False))
    # category ids 3 (cat), 7 (dog), 90 (bird) -> labels 1, 2, 3
    assert items[1][1]["labels"].tolist() == [1, 2]
    assert items[3][1]["labels"].tolist() == [2]
    assert items[5][1]["labels"].tolist() == [3]
    all_labels = torch.cat([t["labels"] for _, t in items.values()])
    assert set(all_labels.tolist()) == {1, 2, 3}
    assert all_labels.dtype == torch.int64


def test_sample_fields_for_every_image_mode(source) -> None:
    items = _by_image_id(DetectionDataset(source, train=False))
    for image_id, (image, target) in items.items():
        record = next(r for r in source.records if r.image_id == image_id)
        assert image.shape == (3, record.height, record.width)  # grayscale/RGBA/palette -> RGB
        assert image.dtype == torch.float32 and 0.0 <= image.min() <= image.max() <= 1.0
        assert target["image_id"] == image_id
        assert target["orig_size"] == (record.height, record.width)
        assert torch.equal(target["scale"], torch.ones(2))
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert items[4][1]["boxes"].shape == (0, 4) and items[4][1]["labels"].shape == (0,)


def test_degenerate_boxes_dropped_after_transform_in_train_mode(source) -> None:
    # at 0.1 scale the 5.4 px box of image 3 becomes 0.54 px wide
    train = _by_image_id(DetectionDataset(source, transform=ScaleBy(0.1), train=True))
    evaluation = _by_image_id(DetectionDataset(source, transform=ScaleBy(0.1), train=False))
    assert train[3][1]["boxes"].shape == (0, 4) and train[3][1]["labels"].shape == (0,)
    assert evaluation[3][1]["boxes"].shape == (1, 4)
    # 20x15 -> 2x1.5 survives
    assert train[1][1]["labels"].tolist() == [1, 2]
    # train mode clips to the image (the box 45.5..50.9 on a 50 px image)
    full = _by_image_id(DetectionDataset(source, train=True))
    assert full[3][1]["boxes"].max().item() == 50.0


def test_collate_and_dataloader(source) -> None:
    loader = DataLoader(DetectionDataset(source), batch_size=3, collate_fn=collate_detection)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [3, 2]
    images, targets = batches[0]
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == [1, 2, 3]


def test_undecodable_image_is_a_dataset_error(source, coco_set) -> None:
    (coco_set.images_dir / "a.png").write_bytes(b"broken")
    with pytest.raises(DatasetError) as info:
        DetectionDataset(source)[0]
    assert info.value.problems[0].record == "image id=1 (a.png)"
    assert "cannot decode image" in info.value.problems[0].message


def test_missing_image_at_read_time_is_a_dataset_error(source, coco_set) -> None:
    (coco_set.images_dir / "b.png").unlink()
    with pytest.raises(DatasetError) as info:
        DetectionDataset(source)[1]
    assert info.value.problems[0].file == str(coco_set.images_dir / "b.png")
