"""Dataset converters to COCO: Pascal VOC XML, KITTI (TAO DetectNet_v2) and YOLO text labels.

Backs ``det-mmdet convert {voc,kitti,yolo} SRC --images DIR --out ANN.json [--classes a,b,c] [--strict]``.

- SRC is a flat directory of label files, one per image: ``*.xml`` (VOC) or ``<image stem>.txt`` (KITTI, YOLO).
- Images are the files in ``--images`` (flat; jpg, jpeg, png, bmp in any case), matched to labels by file stem.
  An image without a label file is kept with no annotations (a negative); a label file without an image is a problem.
- Image sizes come from the image files, as mmdet will load them (EXIF orientation applied).
- Classes are in first-seen order (sorted label files, then line order) unless given; YOLO's come from
  ``--classes``, ``SRC/classes.txt`` or ``SRC/obj.names`` in id order. COCO category ids start at 1.
- Every annotation that cannot be converted is left out and reported as a :class:`Problem` (file, line, message):
  malformed lines, unknown classes, empty boxes, boxes entirely outside the image. A box partly outside the
  image is clipped to it and counted. With ``strict`` any problem is a :class:`UserError`.

VOC coordinates follow mmdet (``VOCDataset`` and ``tools/dataset_converters/pascal_voc.py``): 1 is subtracted
from xmin, ymin, xmax and ymax, so the COCO box is ``[xmin - 1, ymin - 1, xmax - xmin, ymax - ymin]``
(fractional coordinates are kept, not truncated). ``<difficult>1</difficult>`` objects are kept with
``iscrowd: 1``, as mmdet's own converter does: training ignores them (``ignore_flag``) and COCO evaluation neither
rewards nor penalises detections of them, which is what VOC's difficult means.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from PIL import Image  # comes with mmcv

from det_mmdet.errors import UserError

FORMATS = ("voc", "kitti", "yolo")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
YOLO_CLASS_FILES = ("classes.txt", "obj.names")
KITTI_IGNORED = "dontcare"  # compared case-insensitively: TAO and KITTI spell it DontCare, some exports dontcare

_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that rotate by 90 degrees, so width and height swap


@dataclass
class Problem:
    """An annotation (or a whole label file) left out of the output, and why.

    ``line`` is the 1-based line in a text label file, the 1-based object index in a VOC XML file, or None
    when the problem concerns the whole file.
    """

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


@dataclass
class Conversion:
    """The COCO dict and what happened on the way: problems, and counts that are normal but worth a look."""

    coco: dict
    problems: list[Problem]
    images: int
    annotations: int
    unlabelled: int = 0  # images without a label file, kept as negatives
    clipped: int = 0  # boxes partly outside their image, clipped to it
    dontcare: int = 0  # KITTI DontCare regions, skipped
    difficult: int = 0  # VOC difficult objects, kept with iscrowd 1

    def summary(self) -> str:
        """One short paragraph of counts, then every problem as ``file:line: message``."""
        notes = [
            _count(n, *words)
            for n, words in (
                (self.unlabelled, ("image without labels", "images without labels")),
                (self.clipped, ("box clipped to its image", "boxes clipped to their images")),
                (self.dontcare, ("DontCare region skipped", "DontCare regions skipped")),
                (self.difficult, ("difficult object kept as iscrowd", "difficult objects kept as iscrowd")),
            )
            if n
        ]
        head = ", ".join(
            [
                _count(self.images, "image"),
                _count(self.annotations, "annotation"),
                _count(len(self.coco["categories"]), "class", "classes"),
                _count(len(self.problems), "problem"),
            ]
        )
        if notes:
            head += f" ({', '.join(notes)})"
        if not self.problems:
            return head + "."
        return "\n".join([head + "; left out:", *(f"  {p}" for p in self.problems)])


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def convert(fmt: str, src: Path, images: Path, classes: list[str] | None = None, strict: bool = False) -> Conversion:
    """Convert the label files in ``src`` for the images in ``images``; see the module docstring."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, images = Path(src), Path(images)
    if not src.is_dir():
        raise UserError(f"label directory not found: {src}")
    if not images.is_dir():
        raise UserError(f"--images directory not found: {images}")
    if classes is not None:
        classes = _check_classes(classes, "--classes")

    if fmt == "yolo":
        classes = classes if classes is not None else _yolo_classes(src)
        labels = [p for p in sorted(src.glob("*.txt")) if p.name not in YOLO_CLASS_FILES]
    else:
        labels = sorted(src.glob("*.xml" if fmt == "voc" else "*.txt"))
    labels = [p for p in labels if p.is_file()]

    builder = _Builder(images, classes)
    parse = {"voc": builder.voc, "kitti": builder.kitti, "yolo": builder.yolo}[fmt]
    for label in labels:
        parse(label)
    conversion = builder.finish()
    if strict and conversion.problems:
        raise UserError(
            f"{_count(len(conversion.problems), 'problem')} converting {src} (--strict); "
            f"the first: {conversion.problems[0]}"
        )
    return conversion


def write(conversion: Conversion, out: Path) -> None:
    """The COCO JSON at ``out``, creating its directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(conversion.coco))


def _check_classes(names: list[str], source: str) -> list[str]:
    names = [n.strip() for n in names]
    if not names:
        raise UserError(f"{source} names no class")
    if "" in names:
        raise UserError(f"{source} has an empty class name")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"{source} names class {name!r} twice")
        seen.add(name)
    return names


def _yolo_classes(src: Path) -> list[str]:
    for name in YOLO_CLASS_FILES:
        path = src / name
        if path.is_file():
            # Trailing blank lines are common; one in the middle would shift every later id, so it is an error.
            names = path.read_text().rstrip().splitlines()
            return _check_classes(names, str(path))
    raise UserError(
        f"YOLO labels need class names: pass --classes a,b,c or put {' or '.join(YOLO_CLASS_FILES)} in {src}"
    )


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header; mmdet loads with cv2, which applies the EXIF orientation."""
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in _EXIF_TRANSPOSED:
            width, height = height, width
    return width, height


def _floats(fields: list[str]) -> list[float] | None:
    try:
        values = [float(f) for f in fields]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


class _Builder:
    """Collects images, categories, annotations and problems while the label files are read in order."""

    def __init__(self, images: Path, classes: list[str] | None) -> None:
        self.problems: list[Problem] = []
        self.fixed = classes is not None
        self.category_ids = {name: i + 1 for i, name in enumerate(classes or [])}
        self.images: dict[str, dict] = {}  # stem -> COCO image, sorted by file name
        self.unreadable: set[str] = set()  # stems of images already reported, so their labels are not reported again
        for path in sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            if path.stem in self.images:
                other = self.images[path.stem]["file_name"]
                self.problems.append(Problem(str(path), None, f"left out: {other} has the same stem"))
                continue
            try:
                width, height = _image_size(path)
            except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
                self.problems.append(Problem(str(path), None, f"unreadable image, left out: {_one_line(e)}"))
                self.unreadable.add(path.stem)
                continue
            image = {"id": len(self.images) + 1, "file_name": path.name, "width": width, "height": height}
            self.images[path.stem] = image
        self.images_dir = images
        self.labelled: dict[int, str] = {}  # image id -> its label file
        self.annotations: list[dict] = []
        self.counts = {"clipped": 0, "dontcare": 0, "difficult": 0}

    def finish(self) -> Conversion:
        images = sorted(self.images.values(), key=lambda im: im["id"])
        # Dropped images leave gaps; renumber from 1 (their annotations were never added).
        new_ids = {im["id"]: i for i, im in enumerate(images, 1)}
        images = [{**im, "id": new_ids[im["id"]]} for im in images]
        annotations = [{**a, "image_id": new_ids[a["image_id"]]} for a in self.annotations]
        return Conversion(
            coco={
                "images": images,
                "annotations": annotations,
                "categories": [{"id": i, "name": name} for name, i in self.category_ids.items()],
            },
            problems=self.problems,
            images=len(images),
            annotations=len(annotations),
            unlabelled=len(images) - len(self.labelled),
            **self.counts,
        )

    def image_for(self, label: Path, *stems: str) -> dict | None:
        """The image of a label file (first stem that matches), or None after reporting why."""
        for stem in stems:
            image = self.images.get(stem)
            if image is None:
                continue
            if image["id"] in self.labelled:
                other = self.labelled[image["id"]]
                self.problems.append(Problem(str(label), None, f"{image['file_name']} already has labels in {other}"))
                return None
            self.labelled[image["id"]] = str(label)
            return image
        if not self.unreadable.intersection(stems):
            self.problems.append(Problem(str(label), None, f"no image named {stems[0]}.* in {self.images_dir}"))
        return None

    def drop_image(self, image: dict) -> None:
        """An image whose label file cannot be read: keeping it would teach that its objects are background."""
        del self.images[Path(image["file_name"]).stem]
        del self.labelled[image["id"]]

    def add(self, image: dict, file: str, line: int, name: str, box: list[float], raw: str, iscrowd: int = 0) -> None:
        """Check and clip one [x1, y1, x2, y2] pixel box; add it, or report it with ``raw`` as the file writes it."""
        if name not in self.category_ids and self.fixed:
            self.problems.append(Problem(file, line, f"unknown class {name!r} (not in --classes)"))
            return
        x1, y1, x2, y2 = box
        width, height = image["width"], image["height"]
        if x2 <= x1 or y2 <= y1:
            self.problems.append(Problem(file, line, f"empty box ({raw})"))
            return
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            self.problems.append(Problem(file, line, f"box ({raw}) lies outside the {width}x{height} image"))
            return
        clipped = [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]
        if clipped != [x1, y1, x2, y2]:
            self.counts["clipped"] += 1
        x1, y1, x2, y2 = clipped
        # Registered only here, with its first good annotation, so a bad line does not make an empty class.
        category = self.category_ids.setdefault(name, len(self.category_ids) + 1)
        bbox = [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
        self.annotations.append(
            {
                "id": len(self.annotations) + 1,
                "image_id": image["id"],
                "category_id": category,
                "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 3),
                "iscrowd": iscrowd,
                "segmentation": [],
            }
        )
        self.counts["difficult"] += iscrowd

    def read_lines(self, label: Path, image: dict) -> list[tuple[int, list[str]]] | None:
        """(line number, fields) of the non-blank lines, or None (image dropped) if the file cannot be read."""
        try:
            text = label.read_text()
        except (OSError, UnicodeDecodeError) as e:
            self.problems.append(Problem(str(label), None, f"unreadable label file, image left out: {_one_line(e)}"))
            self.drop_image(image)
            return None
        return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]

    def kitti(self, label: Path) -> None:
        file = str(label)
        image = self.image_for(label, label.stem)
        lines = None if image is None else self.read_lines(label, image)
        for n, fields in lines or []:
            if len(fields) not in (15, 16):
                self.problems.append(Problem(file, n, f"{len(fields)} fields, KITTI has 15 (16 with a score)"))
                continue
            values = _floats(fields[1:])
            if values is None:
                self.problems.append(Problem(file, n, f"non-numeric field after the class in {' '.join(fields)!r}"))
                continue
            name = fields[0]
            if name.lower() == KITTI_IGNORED:
                self.counts["dontcare"] += 1
                continue
            self.add(image, file, n, name, values[3:7], " ".join(fields[4:8]))

    def yolo(self, label: Path) -> None:
        file = str(label)
        image = self.image_for(label, label.stem)
        lines = None if image is None else self.read_lines(label, image)
        names = list(self.category_ids)
        for n, fields in lines or []:
            if len(fields) != 5:
                self.problems.append(Problem(file, n, f"{len(fields)} fields, YOLO has 5 (class cx cy w h)"))
                continue
            values = _floats(fields[1:])
            if not (fields[0].isascii() and fields[0].isdigit()) or values is None:
                self.problems.append(Problem(file, n, f"not a class id and 4 numbers: {' '.join(fields)!r}"))
                continue
            class_id = int(fields[0])
            if class_id >= len(names):
                self.problems.append(Problem(file, n, f"class id {class_id} but only {len(names)} classes"))
                continue
            outside = [
                f"{what} {v:g}" for what, v in zip(("cx", "cy", "w", "h"), values, strict=True) if not 0 <= v <= 1
            ]
            if outside:
                self.problems.append(Problem(file, n, f"{', '.join(outside)} outside 0..1"))
                continue
            cx, cy, w, h = values
            width, height = image["width"], image["height"]
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            self.add(image, file, n, names[class_id], box, " ".join(fields[1:]))

    def voc(self, label: Path) -> None:
        file = str(label)
        try:
            root = ET.parse(label).getroot()
        except (OSError, ET.ParseError) as e:
            image = self.image_for(label, label.stem)
            if image is not None:
                self.problems.append(Problem(file, None, f"not valid XML, image left out: {_one_line(e)}"))
                self.drop_image(image)
            return
        # VOC names the XML after the image; <filename> is the fallback for sets where they differ.
        filename = (root.findtext("filename") or "").strip()
        image = self.image_for(label, label.stem, *([Path(filename).stem] if filename else []))
        if image is None:
            return
        size = (_int(root.findtext("size/width")), _int(root.findtext("size/height")))
        # Many tools write 0 or leave size out; another non-zero size means the boxes were drawn on another image.
        if all(size) and size != (image["width"], image["height"]):
            actual = f"{image['width']}x{image['height']}"
            message = f"size {size[0]}x{size[1]} but {image['file_name']} is {actual}; boxes checked against the image"
            self.problems.append(Problem(file, None, message))
        for n, obj in enumerate(root.findall("object"), 1):
            name = (obj.findtext("name") or "").strip()
            coords = [(obj.findtext(f"bndbox/{k}") or "").strip() for k in ("xmin", "ymin", "xmax", "ymax")]
            values = _floats(coords)
            difficult = (obj.findtext("difficult") or "0").strip()
            if not name:
                self.problems.append(Problem(file, n, "object without a name"))
            elif values is None:
                self.problems.append(Problem(file, n, "object without numeric bndbox xmin, ymin, xmax, ymax"))
            elif difficult not in ("0", "1"):
                self.problems.append(Problem(file, n, f"difficult is {difficult!r}, not 0 or 1"))
            else:
                raw = "xmin {} ymin {} xmax {} ymax {}".format(*coords)
                self.add(image, file, n, name, [v - 1 for v in values], raw, iscrowd=int(difficult))


def _int(text: str | None) -> int:
    """VOC's declared <size>, 0 when absent or unparsable: only a cross-check, the image gives the real size."""
    try:
        return int(float(text or 0))
    except ValueError:
        return 0


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
