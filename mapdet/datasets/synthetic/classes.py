"""The classes of the synthetic world: Vistas names per release, palette colours, how often and how
large each thing class appears, where it stands and how it is drawn.

``THINGS`` are the 12 thing classes (``Thing``: ``names`` = (v1.2 name, v2.0 name), ``height`` a
fraction of the image height at the nearest depth, ``aspect`` width / height, ``place`` ground |
air | sky, ``draw`` a ``mapdet.datasets.synthetic.shapes`` painter). ``STUFF`` are the stuff
labels by key; a release without one has ``None`` for its name. ``label_table(version)`` lists
every label of a release for its config file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mapdet.datasets.synthetic import shapes


@dataclass(frozen=True)
class Thing:
    names: tuple[str, str]  # (v1.2 name, v2.0 name)
    readable: str
    color: tuple[int, int, int]  # palette colour of the label PNGs
    share: float  # share of ordinary images containing the class
    mean_count: float  # mean instances in an image that contains it
    height: tuple[float, float]  # fraction of the image height, at the nearest depth
    aspect: tuple[float, float]  # width / height
    place: str  # ground (perspective by depth) | air (signs, lamps) | sky
    draw: Callable
    crowd: bool = False  # may appear as a crowd segment


def _same(name: str) -> tuple[str, str]:
    return name, name


THINGS = (
    Thing(
        _same("object--support--pole"),
        "Pole",
        (153, 153, 153),
        share=0.75,
        mean_count=5,
        height=(0.25, 0.6),
        aspect=(0.015, 0.035),
        place="ground",
        draw=shapes.pole,
    ),
    Thing(
        _same("object--vehicle--car"),
        "Car",
        (0, 0, 142),
        share=0.70,
        mean_count=3.5,
        height=(0.08, 0.18),
        aspect=(1.8, 2.4),
        place="ground",
        draw=shapes.car,
        crowd=True,
    ),
    Thing(
        ("human--person", "human--person--individual"),
        "Person",
        (220, 20, 60),
        share=0.45,
        mean_count=3,
        height=(0.12, 0.3),
        aspect=(0.3, 0.42),
        place="ground",
        draw=shapes.person,
        crowd=True,
    ),
    Thing(
        _same("object--traffic-sign--front"),
        "Traffic Sign (Front)",
        (220, 220, 0),
        share=0.40,
        mean_count=2,
        height=(0.05, 0.1),
        aspect=(0.9, 1.1),
        place="air",
        draw=shapes.sign,
    ),
    Thing(
        _same("object--street-light"),
        "Street Light",
        (210, 170, 100),
        share=0.25,
        mean_count=2,
        height=(0.03, 0.06),
        aspect=(1.0, 1.0),
        place="air",
        draw=shapes.street_light,
    ),
    Thing(
        ("object--traffic-light", "object--traffic-light--general-upright"),
        "Traffic Light",
        (250, 170, 30),
        share=0.20,
        mean_count=1.8,
        height=(0.07, 0.12),
        aspect=(0.36, 0.44),
        place="air",
        draw=shapes.traffic_light,
    ),
    Thing(
        _same("object--vehicle--bicycle"),
        "Bicycle",
        (119, 11, 32),
        share=0.08,
        mean_count=1.5,
        height=(0.08, 0.14),
        aspect=(1.6, 1.9),
        place="ground",
        draw=shapes.bicycle,
        crowd=True,
    ),
    Thing(
        _same("object--vehicle--bus"),
        "Bus",
        (0, 60, 100),
        share=0.06,
        mean_count=1,
        height=(0.14, 0.25),
        aspect=(1.8, 2.3),
        place="ground",
        draw=shapes.bus,
    ),
    Thing(
        _same("object--fire-hydrant"),
        "Fire Hydrant",
        (100, 170, 30),
        share=0.022,
        mean_count=1.2,
        height=(0.07, 0.11),
        aspect=(0.6, 0.7),
        place="ground",
        draw=shapes.hydrant,
    ),
    Thing(
        _same("object--vehicle--trailer"),
        "Trailer",
        (0, 0, 110),
        share=0.022,
        mean_count=1.2,
        height=(0.12, 0.2),
        aspect=(2.0, 2.5),
        place="ground",
        draw=shapes.trailer,
    ),
    Thing(
        _same("animal--bird"),
        "Bird",
        (165, 42, 42),
        share=0.022,
        mean_count=3,
        height=(0.025, 0.045),
        aspect=(2.0, 2.4),
        place="sky",
        draw=shapes.bird,
    ),
    Thing(
        _same("object--vehicle--caravan"),
        "Caravan",
        (0, 0, 90),
        share=0.022,
        mean_count=1.2,
        height=(0.14, 0.22),
        aspect=(1.8, 2.2),
        place="ground",
        draw=shapes.caravan,
    ),
)

# key -> ((v1.2 name, v2.0 name), readable, palette colour); a None name: absent from that release
STUFF = {
    "road": (_same("construction--flat--road"), "Road", (128, 64, 128)),
    "sidewalk": (_same("construction--flat--sidewalk"), "Sidewalk", (244, 35, 232)),
    "building": (_same("construction--structure--building"), "Building", (70, 70, 70)),
    "sky": (_same("nature--sky"), "Sky", (70, 130, 180)),
    "vegetation": (_same("nature--vegetation"), "Vegetation", (107, 142, 35)),
    "marking": (("marking--general", "marking--continuous--dashed"), "Lane Marking", (255, 255, 255)),
    "on-rails": (_same("object--vehicle--on-rails"), "On Rails", (0, 80, 100)),  # thing-like but stuff
    "person-group": ((None, "human--person--person-group"), "Person Group", (220, 20, 60)),
    "vehicle-group": ((None, "object--vehicle--vehicle-group"), "Vehicle Group", (0, 0, 142)),
    "ego": (_same("void--ego-vehicle"), "Ego Vehicle", (0, 0, 0)),
    "unlabeled": (_same("void--unlabeled"), "Unlabeled", (0, 0, 0)),
}


def label_table(version: str) -> list[tuple[tuple[str, str], str, tuple, bool]]:
    """(names, readable, colour, is_thing) of every label of ``version``, unsorted."""
    v = int(version == "v2.0")
    table = [(t.names, t.readable, t.color, True) for t in THINGS]
    table += [(names, readable, color, False) for names, readable, color in STUFF.values() if names[v]]
    return table
