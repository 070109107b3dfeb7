"""Every caption-file format in circulation, one loader: :func:`load_dataset`.

Formats (detected from the file's content, or forced with ``format=``); each is one module that
registers a :class:`~rsitr.data.captions.registry.CaptionFormat` with ``@register_format(name)``,
and detection asks each registered format in turn (:func:`list_formats` gives their names):

``karpathy`` (:mod:`~rsitr.data.captions.karpathy`)
    ``{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}, ...], "filepath"?}]}`` as
    RSICD, RSITMD, UCM-Captions and Sydney-Captions ship it (RSITMD's ``.tif`` names, UCM's
    numeric ``1.tif``, any number of sentences per image). A sentence without ``raw`` falls back
    to its joined ``tokens``. ``filepath`` is prefixed to the file name when present. Split
    ``restval`` (COCO's Karpathy split) is read as ``train`` (logged). NWPU-Captions' variant,
    ``{"<class>": [{"filename", "split", "raw", "raw_1", ..., "raw_4"}]}`` (images under
    ``<class>/``), is read as the same format, with the class key as the scene label.
``pir`` (:mod:`~rsitr.data.captions.pir`)
    The PIR/HarMA JSON list ``[{"image": "test/parking_229.tif", "caption": str | [str, ...]}]``.
    Entries of one image are merged (RSITMD's train file: 17,175 entries -> 3,435 images); the
    split comes from the path prefix ``train/``, ``val/``, ``test/``. ``label_name`` is kept.
``iebaker-csv`` (:mod:`~rsitr.data.captions.iebaker_csv`)
    ``filename,title``, one row per caption (iEBAKER's ``rsitmd_test.csv``); the file name may
    be an absolute path from another machine (``/home/.../RSITMD/images/boat_0.tif``).
``csv`` (:mod:`~rsitr.data.captions.simple_csv`)
    ``image,caption[,split]`` with a header, one row per caption (column aliases: image/filename/
    file/path, caption/text/sentence/raw/title).

Splits (:mod:`~rsitr.data.captions.splits`). Every image ends in ``train``, ``val`` or ``test``;
any other name is an error. ``split=`` gives the split of entries whose annotation has no split
*field* (iEBAKER CSV rows, CSV rows with an empty or absent split column, Karpathy images without
``split``), and it replaces the path-prefix guess of the PIR format. When neither exists, the split is read from the
annotation's file name if that names exactly one split as a word (``rsitmd_test.csv`` -> test,
logged); otherwise loading stops and asks for ``split=`` (CLI: ``--split``).

Image paths (:mod:`~rsitr.data.captions.paths`). Each listed path is resolved by the first rule
that finds an existing file:

1. ``as-written``: the path as listed, absolute, or relative to the image root;
2. ``trailing``: its trailing components, dropping leading ones one at a time
   (``/home/x/RSITMD/images/boat_0.tif`` -> ``x/RSITMD/images/boat_0.tif`` -> ... ->
   ``images/boat_0.tif``), relative to the image root;
3. ``basename``: the bare file name under the image root.

The image root is ``image_root=`` when given; otherwise the annotation's folder, then its
``images/`` subfolder (each rule is tried on both roots before the next rule). A path no rule finds
is ``unresolved`` and keeps its as-written form. The counts per rule are attached to the returned
dataset as ``dataset.load_info.resolution`` (see :class:`LoadInfo`) and logged.

Validation. A :class:`~rsitr.utils.errors.DataError` names the file and entry for: malformed
JSON/CSV (with line and column), an entry without image or captions, an empty caption, an
unknown split, a duplicate image id (Karpathy; PIR/CSV rows of one image are merged by design),
a missing image file and an unreadable one (header check only: ``PIL.Image.open`` + ``size``, in
a thread pool). With ``skip_bad=True`` each problem is logged, recorded in
``dataset.problems`` and skipped (an image left with no captions is dropped); malformed files
still raise. ``check_images=False`` skips the file checks (paths are still resolved).

Scene labels: see :mod:`~rsitr.data.captions.scene_labels` and :mod:`rsitr.data.labels`
(``labels=`` None/"auto", a CSV path, "filename", "ucm-order", "none").

The loader itself is :mod:`~rsitr.data.captions.loader`.
"""
from __future__ import annotations

# the format modules register themselves on import; this order is the detection order (iEBAKER's
# strict 'filename,title' header before the simple CSV's aliases, which would also accept it)
from rsitr.data.captions import karpathy, pir, iebaker_csv, simple_csv  # noqa: F401
from rsitr.data.captions.base import LoadInfo
from rsitr.data.captions.loader import find_annotations, load_dataset, load_with_info
from rsitr.data.captions.paths import RESOLUTION_RULES, check_image, check_images_parallel, resolve_image_path
from rsitr.data.captions.registry import CaptionFormat, detect_format, list_formats, register_format
from rsitr.data.captions.splits import SPLIT_ALIASES, split_from_filename

FORMATS = tuple(list_formats())  # the built-in formats, in detection order

__all__ = [
    "FORMATS", "RESOLUTION_RULES", "SPLIT_ALIASES", "CaptionFormat", "LoadInfo", "check_image", "check_images_parallel",
    "detect_format", "find_annotations", "list_formats", "load_dataset", "load_with_info", "register_format",
    "resolve_image_path", "split_from_filename",
]
