"""The synthetic benchmark: procedurally drawn aerial-like tiles with captions that are true of them.

``rsitr data synth --out DIR`` (:func:`write_synth`) writes the layout of the real benchmarks::

    DIR/images/<class>_<k>.png      RSICD-style names: the scene class is in the file name
    DIR/labels.csv                  filename,class
    DIR/dataset_synth.json          Karpathy layout ({"dataset", "images": [{"filename", "imgid",
                                    "split", "sentids", "sentences": [{"raw", "tokens", "imgid",
                                    "sentid", "noisy"}]}]})

How an image is made. For image ``i`` a :class:`Scene` (the description) is drawn from a numpy
Generator seeded by ``(seed, i)``: the scene class, landmarks (river, roads, runway, water,
lake, field grid, track, parking lot) and countable objects (buildings, houses, trees, cars,
ships, airplanes, storage tanks, fields, umbrellas, containers) with colour names, positions and
orientations. The tile is rendered from the scene with PIL ``ImageDraw`` (shadows, roof ridges,
lane markings, stripes, ripples), then textured (low-frequency illumination and grain noise) so
classes are not separable by mean colour. The five captions are rendered from the *same* scene:
one or two generic sentences and three or four detailed ones that state counts ("three red
cars"), colours ("a white ship") and spatial relations ("in the top right corner", "to the left
of the river", "next to the runway"), so two tiles of one class differ in what their captions
say. Every detailed caption carries machine-checkable claims (:class:`Caption.claims`) that the
tests verify against the scene geometry.

Conventions of the caption text: a number word (``one`` ... ``twelve``) in front of a noun,
optionally with a colour word (``"three red cars"``) or followed by ``"with <colour> roofs"``,
is the exact number of such objects in the whole image; larger counts are said as "many".

Noise (``noise_frac``): that fraction of the *train* captions is replaced by weakly related
ones — a caption of an image of another class (2/3) or an unrelated generic sentence (1/3) —
marked ``"noisy": true`` in the JSON (``false`` elsewhere; Karpathy readers ignore the field).
At most 4 of an image's 5 captions are replaced. Val/test captions are never touched.

Determinism: same arguments -> byte-identical JSON, CSV and PNGs, whatever ``workers`` is (each
image has its own generator; no global RNG). Atomicity: an existing JSON is removed first, the
images are written to a temporary folder that replaces ``images/`` once complete, then
labels.csv and finally the JSON are written atomically — a crash never leaves a JSON that points
at missing or half-written images.

The benchmark is for tests, the demo and relative comparisons; never tune a method to it.

One module per job: :mod:`~rsitr.data.synth.scene` (the scene model and its geometry),
:mod:`~rsitr.data.synth.palette` (colours), :mod:`~rsitr.data.synth.language` (vocabulary and
caption sentences), :mod:`~rsitr.data.synth.placement` and :mod:`~rsitr.data.synth.builders` (the
scenes of each class), :mod:`~rsitr.data.synth.rendering` (the tile), :mod:`~rsitr.data.synth.writer`
(the files). ``rsitr data synth`` is wired in :mod:`rsitr.cli`.
"""
from __future__ import annotations

from rsitr.data.synth.builders import BUILDERS, make_scene
from rsitr.data.synth.language import (
    CAPTIONS_PER_IMAGE, GENERIC_NOISE, NOUNS, NUMBER_WORDS, REGION_PHRASES, Caption, count_phrase, tokens_of,
)
from rsitr.data.synth.palette import COLORS
from rsitr.data.synth.rendering import render
from rsitr.data.synth.scene import CLASSES, Obj, Scene, band_center, on_water_side, region_of, side_of_band
from rsitr.data.synth.writer import (
    MAX_NOISY_PER_IMAGE, assign_noise, bench_dataset, generate, image_rng, plan, write_synth,
)

__all__ = [
    "BUILDERS", "CAPTIONS_PER_IMAGE", "CLASSES", "COLORS", "GENERIC_NOISE", "MAX_NOISY_PER_IMAGE", "NOUNS",
    "NUMBER_WORDS", "REGION_PHRASES", "Caption", "Obj", "Scene", "assign_noise", "band_center", "bench_dataset",
    "count_phrase", "generate", "image_rng", "make_scene", "on_water_side", "plan", "region_of", "render",
    "side_of_band", "tokens_of", "write_synth",
]
