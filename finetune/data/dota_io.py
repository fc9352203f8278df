"""DOTA's text formats: class lists, labelTxt files (ground truth) and Task1 submissions
(detections). Both the dataset readers and the evaluator use them, so they live below both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOTA_V1_CLASSES = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle",
    "ship", "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout",
    "harbor", "swimming-pool", "helicopter",
)
DOTA_V15_CLASSES = DOTA_V1_CLASSES + ("container-crane",)
DOTA_V2_CLASSES = DOTA_V15_CLASSES + ("airport", "helipad")
DIOR_CLASSES = (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney",
    "expressway-service-area", "expressway-toll-station", "dam", "golffield", "groundtrackfield",
    "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation",
    "vehicle", "windmill",
)

@dataclass(frozen=True)
class DotaObject:
    """One annotated object: 4 corners (x1, y1, ..., x4, y4), class name, difficult flag."""

    poly: tuple
    cls: str
    difficult: bool = False


def read_dota_label_file(path) -> list[DotaObject]:
    """Parse one DOTA labelTxt file: optional `imagesource:`/`gsd:` header lines, then
    `x1 y1 x2 y2 x3 y3 x4 y4 class difficult` per object (difficult may be missing: 0)."""
    objects = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts or (len(parts) == 1 and ":" in parts[0]) or line.startswith(("imagesource", "gsd")):
            continue
        if len(parts) not in (9, 10):
            raise ValueError(f"{path}:{n}: expected 'x1 y1 ... x4 y4 class [difficult]', got {line!r}.")
        try:
            poly = tuple(float(v) for v in parts[:8])
        except ValueError:
            raise ValueError(f"{path}:{n}: corner coordinates must be numbers, got {line!r}.") from None
        objects.append(DotaObject(poly, parts[8], len(parts) == 10 and parts[9] not in ("0", "0.0")))
    return objects


def read_image_ids(image_ids) -> list[str] | None:
    """None, a list of ids, or the path of a list file (one id per line, as DOTA's images.txt or
    DIOR's ImageSets/Main/*.txt) -> list of ids (or None)."""
    if image_ids is None or not isinstance(image_ids, (str, Path)):
        return None if image_ids is None else list(image_ids)
    return Path(image_ids).read_text().split()


def read_dota_labels(folder, image_ids=None) -> dict[str, list[DotaObject]]:
    """A labelTxt folder -> {image id: [DotaObject]} (all `*.txt`, or only `image_ids`: a list
    or a list file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no labelTxt folder at {folder}.")
    image_ids = read_image_ids(image_ids)
    paths = [folder / f"{i}.txt" for i in image_ids] if image_ids is not None else sorted(folder.glob("*.txt"))
    return {p.stem: read_dota_label_file(p) for p in paths}


def write_dota_label_file(path, target: dict, classes) -> None:
    """Write a detection target dict as a DOTA labelTxt file (difficult as 0/1)."""
    lines = [" ".join(f"{v:.1f}" for v in poly) + f" {classes[int(c)]} {int(d)}"
             for poly, c, d in zip(target["polys"].tolist(), target["labels"], target["difficult"])]
    Path(path).write_text("".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- submission format
def read_dota_submission(folder) -> dict[str, list[tuple[str, float, list[float]]]]:
    """Read a DOTA Task1 submission folder (`Task1_<class>.txt`) into {class: [(image, score, poly)]}."""
    folder = Path(folder)
    files = sorted(folder.glob("Task1_*.txt"))
    if not files:
        raise FileNotFoundError(f"no Task1_<class>.txt files in {folder}.")
    dets = {}
    for path in files:
        cls = path.stem[len("Task1_"):]
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 10:
                raise ValueError(f"{path}:{n}: expected 'image score x1 y1 ... x4 y4' (10 fields), got {len(parts)}.")
            rows.append((parts[0], float(parts[1]), [float(v) for v in parts[2:]]))
        dets[cls] = rows
    return dets


def write_dota_submission(dets: dict, folder) -> list[Path]:
    """Write {class: [(image, score, poly)]} as a DOTA Task1 submission folder; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for cls, rows in sorted(dets.items()):
        path = folder / f"Task1_{cls}.txt"
        lines = [f"{img} {score:.6g} " + " ".join(f"{v:.1f}" for v in poly) for img, score, poly in rows]
        path.write_text("".join(line + "\n" for line in lines))
        paths.append(path)
    return paths
