"""det_mmdet.convert: VOC, KITTI and YOLO labels to COCO, on small generated data sets."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from det_mmdet.convert import FORMATS, Conversion, Problem, convert, write
from det_mmdet.errors import UserError

W, H = 64, 48


def make_image(directory: Path, name: str, width: int = W, height: int = H) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    assert cv2.imwrite(str(path), np.full((height, width, 3), 127, np.uint8))
    return path


def write_labels(directory: Path, name: str, lines: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def kitti_line(name: str, box: tuple[float, float, float, float], score: bool = False) -> str:
    fields = [name, "0.00", "0", "0.00", *(f"{v:.2f}" for v in box), *["0.00"] * 7]
    return " ".join(fields + (["0.87"] if score else []))


def yolo_line(class_id: int, box: tuple[float, float, float, float], width: int = W, height: int = H) -> str:
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
    return f"{class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def voc_xml(filename: str, objects: list[str], width: int = W, height: int = H) -> str:
    return (
        f"<annotation><filename>{filename}</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>{''.join(objects)}</annotation>"
    )


def voc_object(name: str, xmin, ymin, xmax, ymax, difficult: int | None = None) -> str:
    flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (
        f"<object><name>\n  {name}\n</name>{flag}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def boxes_by_image(conversion: Conversion) -> dict[str, list[tuple[str, list[float]]]]:
    """file_name -> [(class name, [x, y, w, h])] in annotation order."""
    coco = conversion.coco
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out: dict[str, list] = {name: [] for name in files.values()}
    for ann in coco["annotations"]:
        out[files[ann["image_id"]]].append((names[ann["category_id"]], ann["bbox"]))
    return out


def assert_boxes(actual: list[tuple[str, list[float]]], expected: list[tuple[str, tuple]]) -> None:
    """Expected boxes are x1 y1 x2 y2 in pixels; COCO's are x y w h."""
    assert [name for name, _ in actual] == [name for name, _ in expected]
    for (_, bbox), (_, (x1, y1, x2, y2)) in zip(actual, expected, strict=True):
        assert bbox == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=2e-3)


def load_with_pycocotools(conversion: Conversion, out: Path) -> COCO:
    write(conversion, out)
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == conversion.images
    assert len(coco.getAnnIds()) == conversion.annotations
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3], abs=1e-2)
    return coco


def problems(conversion: Conversion) -> list[tuple[str, int | None]]:
    return [(Path(p.file).name, p.line) for p in conversion.problems]


# Round trips: known boxes written in each format come back as the same COCO boxes.

KNOWN = {
    "a": [("car", (3.0, 4.0, 30.0, 20.0)), ("person", (40.0, 10.0, 60.0, 47.0))],
    "b": [("person", (0.0, 0.0, 64.0, 48.0))],
}


def test_kitti_round_trip(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    for stem, objects in KNOWN.items():
        make_image(images, f"{stem}.png")
        write_labels(labels, f"{stem}.txt", [kitti_line(n, box, score=(stem == "b")) for n, box in objects])

    conversion = convert("kitti", labels, images)

    assert conversion.problems == []
    found = boxes_by_image(conversion)
    assert set(found) == {"a.png", "b.png"}
    for stem, objects in KNOWN.items():
        assert_boxes(found[f"{stem}.png"], objects)
    assert [(im["width"], im["height"]) for im in conversion.coco["images"]] == [(W, H), (W, H)]
    assert [im["id"] for im in conversion.coco["images"]] == [1, 2]
    assert {a["iscrowd"] for a in conversion.coco["annotations"]} == {0}
    coco = load_with_pycocotools(conversion, tmp_path / "out" / "ann.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["car", "person"]


def test_yolo_round_trip_with_classes_txt(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_labels(labels, "classes.txt", ["person", "car", "unused", ""])
    ids = {"person": 0, "car": 1}
    for stem, objects in KNOWN.items():
        make_image(images, f"{stem}.JPG")
        write_labels(labels, f"{stem}.txt", [yolo_line(ids[n], box) for n, box in objects])

    conversion = convert("yolo", labels, images)

    assert conversion.problems == []
    # Class ids follow the file, unused classes included, not first-seen order.
    assert conversion.coco["categories"] == [
        {"id": 1, "name": "person"},
        {"id": 2, "name": "car"},
        {"id": 3, "name": "unused"},
    ]
    found = boxes_by_image(conversion)
    for stem, objects in KNOWN.items():
        assert_boxes(found[f"{stem}.JPG"], objects)
    load_with_pycocotools(conversion, tmp_path / "ann.json")


def test_voc_round_trip_follows_mmdet_convention(tmp_path):
    images, labels = tmp_path / "JPEGImages", tmp_path / "Annotations"
    make_image(images, "000001.jpg")
    objects = [voc_object("dog", 11, 6, 30, 25), voc_object("cat", 1, 1, 64, 48, difficult=1)]
    write_labels(labels, "000001.xml", [voc_xml("000001.jpg", objects)])

    conversion = convert("voc", labels, images)

    assert conversion.problems == []
    # mmdet subtracts 1 from every coordinate: xmin 11..xmax 30 is x 10, w 19.
    assert_boxes(boxes_by_image(conversion)["000001.jpg"], [("dog", (10, 5, 29, 24)), ("cat", (0, 0, 63, 47))])
    assert [a["iscrowd"] for a in conversion.coco["annotations"]] == [0, 1]
    assert conversion.difficult == 1
    assert "1 difficult object kept as iscrowd" in conversion.summary()
    coco = load_with_pycocotools(conversion, tmp_path / "ann.json")
    assert [a["iscrowd"] for a in coco.loadAnns(coco.getAnnIds())] == [0, 1]


def test_voc_falls_back_to_filename_and_keeps_fractions(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "xml"
    make_image(images, "photo.png")
    write_labels(labels, "label_0.xml", [voc_xml("photo.png", [voc_object("dog", 10.5, 5.5, 20.25, 30)])])

    conversion = convert("voc", labels, images)

    assert conversion.problems == []
    assert_boxes(boxes_by_image(conversion)["photo.png"], [("dog", (9.5, 4.5, 19.25, 29))])


# Classes: first-seen order, or the given order.


def kitti_classes_set(tmp_path) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    for stem in ("a", "b"):
        make_image(images, f"{stem}.jpg")
    write_labels(labels, "b.txt", [kitti_line("Car", (1, 1, 10, 10)), kitti_line("Van", (2, 2, 12, 12))])
    write_labels(labels, "a.txt", [kitti_line("Van", (1, 1, 10, 10)), kitti_line("Cyclist", (0, 0, 3, 3))])
    return labels, images


def test_classes_in_first_seen_order(tmp_path):
    conversion = convert("kitti", *kitti_classes_set(tmp_path))

    # Sorted files (a before b), then line order.
    assert conversion.coco["categories"] == [
        {"id": 1, "name": "Van"},
        {"id": 2, "name": "Cyclist"},
        {"id": 3, "name": "Car"},
    ]
    found = boxes_by_image(conversion)
    assert [n for n, _ in found["a.jpg"]] == ["Van", "Cyclist"]
    assert [n for n, _ in found["b.jpg"]] == ["Car", "Van"]


def test_given_classes_order_and_unknown_class(tmp_path):
    labels, images = kitti_classes_set(tmp_path)

    conversion = convert("kitti", labels, images, classes=["Car", "Van", "Truck"])

    assert conversion.coco["categories"] == [
        {"id": 1, "name": "Car"},
        {"id": 2, "name": "Van"},
        {"id": 3, "name": "Truck"},
    ]
    assert conversion.problems == [Problem(str(labels / "a.txt"), 2, "unknown class 'Cyclist' (not in --classes)")]
    assert conversion.annotations == 3
    assert [n for n, _ in boxes_by_image(conversion)["a.jpg"]] == ["Van"]


def test_a_class_with_only_bad_boxes_is_not_a_category(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    write_labels(labels, "a.txt", [kitti_line("Ghost", (10, 10, 5, 20)), kitti_line("Car", (1, 1, 5, 5))])

    conversion = convert("kitti", labels, images)

    assert conversion.coco["categories"] == [{"id": 1, "name": "Car"}]
    assert problems(conversion) == [("a.txt", 1)]


# Bad annotations: reported with file and line, left out; the rest is kept.


def test_kitti_bad_lines(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    make_image(images, "b.jpg")
    write_labels(labels, "a.txt", [kitti_line("Car", (1, 1, 10, 10))])
    write_labels(
        labels,
        "b.txt",
        [
            kitti_line("Car", (5, 5, 15, 15)),  # 1: good
            "Car 0 0 0 1 2 3 4",  # 2: too few fields
            kitti_line("Car", (1, 1, 10, 10)).replace(" 0.00 0 ", " x 0 ", 1),  # 3: not a number
            kitti_line("Car", (20, 5, 10, 15)),  # 4: x2 < x1
            kitti_line("Car", (5, 15, 15, 15)),  # 5: y2 == y1
            "",  # 6: blank, ignored
            kitti_line("Car", (70, 5, 90, 15)),  # 7: right of the image
            kitti_line("Car", (-20, -10, -1, 30)),  # 8: left of the image
            kitti_line("Traffic sign", (1, 1, 9, 9)),  # 9: a space in the class shifts every column
            kitti_line("Car", (-5, 40, 30, 60)),  # 10: partly outside: clipped
            kitti_line("DontCare", (0, 0, 64, 48)),  # 11: skipped, not a problem
        ],
    )

    conversion = convert("kitti", labels, images)

    assert problems(conversion) == [("b.txt", n) for n in (2, 3, 4, 5, 7, 8, 9)]
    messages = [p.message for p in conversion.problems]
    assert "8 fields" in messages[0]
    assert messages[2].startswith("empty box") and messages[3].startswith("empty box")
    assert "outside the 64x48 image" in messages[4] and "outside the 64x48 image" in messages[5]
    found = boxes_by_image(conversion)
    assert_boxes(found["b.jpg"], [("Car", (5, 5, 15, 15)), ("Car", (0, 40, 30, 48))])
    assert conversion.annotations == 3
    assert conversion.clipped == 1
    assert conversion.dontcare == 1
    assert [c["name"] for c in conversion.coco["categories"]] == ["Car"]
    summary = conversion.summary()
    assert "1 DontCare region skipped" in summary and "1 box clipped to its image" in summary
    assert f"  {labels / 'b.txt'}:4: empty box (20.00 5.00 10.00 15.00)" in summary.splitlines()


def test_yolo_bad_lines(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.png")
    write_labels(
        labels,
        "a.txt",
        [
            "0 0.5 0.5 0.25 0.5",  # 1: good
            "0 0.5 0.5 1.2 0.5",  # 2: w outside 0..1
            "2 0.5 0.5 0.2 0.2",  # 3: class id past the classes
            "0 0.5 0.5 0.2",  # 4: 4 fields
            "0 0.1 0.2 0.3 0.4 0.5 0.6",  # 5: a polygon (segmentation labels), not a box
            "car 0.5 0.5 0.2 0.2",  # 6: class name, not id
            "-1 0.5 0.5 0.2 0.2",  # 7: negative id
            "1 0.5 0.5 0 0.3",  # 8: zero width
            "1 0.5 0.5 nan 0.3",  # 9: not finite
            "1 1.0 1.0 0.5 0.5",  # 10: partly outside: clipped to the corner quarter
        ],
    )

    conversion = convert("yolo", labels, images, classes=["person", "car"])

    assert problems(conversion) == [("a.txt", n) for n in range(2, 10)]
    assert conversion.problems[0].message == "w 1.2 outside 0..1"
    assert conversion.problems[1].message == "class id 2 but only 2 classes"
    assert_boxes(boxes_by_image(conversion)["a.png"], [("person", (24, 12, 40, 36)), ("car", (48, 36, 64, 48))])
    assert conversion.clipped == 1


def test_voc_bad_objects_and_files(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    for stem in ("a", "b", "c"):
        make_image(images, f"{stem}.jpg")
    objects = [
        voc_object("dog", 2, 2, 10, 10),  # 1: good
        "<object><name>dog</name></object>",  # 2: no bndbox
        voc_object("", 2, 2, 10, 10),  # 3: no name
        voc_object("dog", 2, 2, 10, "ten"),  # 4: not a number
        voc_object("dog", 80, 2, 90, 10),  # 5: outside
        voc_object("dog", 2, 2, 10, 10, difficult=7),  # 6: difficult neither 0 nor 1
    ]
    write_labels(labels, "a.xml", [voc_xml("a.jpg", objects)])
    write_labels(labels, "b.xml", ["<annotation><object>"])  # not valid XML: the image is left out
    write_labels(labels, "c.xml", [voc_xml("c.jpg", [voc_object("cat", 1, 1, 5, 5)], width=640, height=480)])

    conversion = convert("voc", labels, images)

    assert problems(conversion) == [("a.xml", n) for n in (2, 3, 4, 5, 6)] + [("b.xml", None), ("c.xml", None)]
    assert "not valid XML" in conversion.problems[5].message
    assert "size 640x480 but c.jpg is 64x48" in conversion.problems[6].message
    # b.jpg has objects we could not read; as a negative it would teach that they are background.
    assert [im["file_name"] for im in conversion.coco["images"]] == ["a.jpg", "c.jpg"]
    assert [im["id"] for im in conversion.coco["images"]] == [1, 2]
    assert_boxes(boxes_by_image(conversion)["a.jpg"], [("dog", (1, 1, 9, 9))])
    assert_boxes(boxes_by_image(conversion)["c.jpg"], [("cat", (0, 0, 4, 4))])
    load_with_pycocotools(conversion, tmp_path / "ann.json")


# Matching labels and images.


def test_label_without_image_is_a_problem_and_image_without_label_a_negative(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpeg")
    make_image(images, "negative.bmp", width=32, height=16)
    (images / "notes.txt").write_text("not an image")
    write_labels(labels, "a.txt", [kitti_line("Car", (1, 1, 10, 10))])
    write_labels(labels, "orphan.txt", [kitti_line("Car", (1, 1, 10, 10))])

    conversion = convert("kitti", labels, images)

    assert conversion.problems == [Problem(str(labels / "orphan.txt"), None, f"no image named orphan.* in {images}")]
    assert [(im["file_name"], im["width"], im["height"]) for im in conversion.coco["images"]] == [
        ("a.jpeg", W, H),
        ("negative.bmp", 32, 16),
    ]
    assert conversion.annotations == 1
    assert conversion.unlabelled == 1
    assert "1 image without labels" in conversion.summary()


def test_unreadable_and_duplicate_images(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    make_image(images, "a.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    write_labels(labels, "broken.txt", [kitti_line("Car", (1, 1, 10, 10))])

    conversion = convert("kitti", labels, images)

    # The broken image is reported once, not again for its label file.
    assert problems(conversion) == [("a.png", None), ("broken.jpg", None)]
    assert "a.jpg has the same stem" in conversion.problems[0].message
    assert [im["file_name"] for im in conversion.coco["images"]] == ["a.jpg"]


def test_image_size_as_mmdet_loads_it(tmp_path):
    """A JPEG with EXIF orientation 6 is stored 64x48 but cv2 (mmdet's loader) gives it 48 wide, 64 high."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / "rotated.jpg", exif=exif)
    write_labels(labels, "rotated.txt", [kitti_line("Car", (1, 1, 40, 60))])

    conversion = convert("kitti", labels, images)

    loaded = cv2.imread(str(images / "rotated.jpg"))
    image = conversion.coco["images"][0]
    assert (image["height"], image["width"]) == loaded.shape[:2] == (W, H)
    assert conversion.clipped == 0 and conversion.problems == []


# Strict mode and user errors.


def test_strict_raises_one_line_with_count_and_first_problem(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    write_labels(labels, "a.txt", ["Car 1 2", kitti_line("Car", (1, 1, 10, 10)), kitti_line("Car", (9, 1, 1, 10))])

    assert len(convert("kitti", labels, images).problems) == 2
    with pytest.raises(UserError) as error:
        convert("kitti", labels, images, strict=True)

    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("2 problems")
    assert f"{labels / 'a.txt'}:1: 3 fields" in message


def test_strict_passes_clean_data(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    write_labels(labels, "a.txt", [kitti_line("Car", (1, 1, 10, 10)), kitti_line("DontCare", (1, 1, 5, 5))])

    assert convert("kitti", labels, images, strict=True).annotations == 1


def test_yolo_needs_class_names(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    write_labels(labels, "a.txt", ["0 0.5 0.5 0.5 0.5"])

    with pytest.raises(UserError, match="--classes") as error:
        convert("yolo", labels, images)
    assert "classes.txt" in str(error.value) and "obj.names" in str(error.value)

    write_labels(labels, "obj.names", ["drone"])
    conversion = convert("yolo", labels, images)
    assert conversion.coco["categories"] == [{"id": 1, "name": "drone"}]
    assert conversion.annotations == 1 and conversion.problems == []

    # --classes wins over the file.
    assert convert("yolo", labels, images, classes=["bird"]).coco["categories"] == [{"id": 1, "name": "bird"}]


@pytest.mark.parametrize(
    ("classes", "match"), [(["a", "b", "a"], "'a' twice"), (["a", " "], "empty class name"), ([], "no class")]
)
def test_bad_classes(tmp_path, classes, match):
    (tmp_path / "labels").mkdir()
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=match):
        convert("kitti", tmp_path / "labels", tmp_path / "images", classes=classes)


def test_missing_directories_and_unknown_format(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="nope"):
        convert("kitti", tmp_path / "nope", tmp_path / "images")
    with pytest.raises(UserError, match="--images.*missing"):
        convert("yolo", tmp_path / "labels", tmp_path / "missing", classes=["a"])
    with pytest.raises(UserError) as error:
        convert("coco", tmp_path / "labels", tmp_path / "images")
    assert all(fmt in str(error.value) for fmt in FORMATS)


def test_write_makes_loadable_json(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    labels.mkdir()
    conversion = convert("kitti", labels, images)
    out = tmp_path / "nested" / "dir" / "ann.json"

    write(conversion, out)

    data = json.loads(out.read_text())
    assert data == conversion.coco
    assert data["images"] == [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}]
    assert data["annotations"] == [] and data["categories"] == []
    assert conversion.summary() == "1 image, 0 annotations, 0 classes, 0 problems (1 image without labels)."


def test_blank_line_inside_classes_txt_is_an_error(tmp_path):
    """A blank line in the middle would shift every later class id."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    write_labels(labels, "classes.txt", ["person", "", "car"])

    with pytest.raises(UserError, match="classes.txt has an empty class name"):
        convert("yolo", labels, images)


def test_console_script_converts_and_reports(tmp_path):
    from conftest import det_mmdet

    images, labels = tmp_path / "images", tmp_path / "labels"
    make_image(images, "a.jpg")
    write_labels(labels, "a.txt", [yolo_line(1, (2, 3, 20, 30)), "1 0.5 0.5 0.2"])
    out = tmp_path / "coco.json"
    r = det_mmdet("convert", "yolo", labels, "--images", images, "--out", out, "--classes", "cat,dog")
    assert r.returncode == 0, r.stderr
    assert f"{labels / 'a.txt'}:2:" in r.stdout and out.is_file()
    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog"] and len(coco.anns) == 1
    strict = det_mmdet("convert", "yolo", labels, "--images", images, "--out", out, "--classes", "cat,dog", "--strict")
    assert strict.returncode == 2 and strict.stderr.startswith("error: 1 problem") and strict.stderr.count("\n") == 1
