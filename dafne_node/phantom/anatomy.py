"""A parametric shape model of both lower legs, cut into axial tissue and label maps.

Why a shape model and not stored masks: training sets need hundreds of distinct subjects and no
real data may be used, so each subject is a handful of random numbers (size, fat, muscle bulk,
bone shape, septum angles, a few Fourier terms per contour) drawn from a seed. The 2D cross-section
of every slice is computed from those numbers interpolated at the slice's level along the leg, so
muscles change smoothly from the knee towards the ankle and differ between subjects and between
the two legs of one subject.

Coordinates. Each leg has a local frame in millimetres: ``u`` points laterally and ``v``
posteriorly, so one model describes both legs and the right leg is its mirror image. Polar angles
``theta = atan2(v, u)`` are measured around the leg centre: 0 is lateral, +90 degrees posterior,
180 medial, -90 anterior. The level along the leg is ``t`` in [0, 1], 0 just below the knee joint
and 1 just above the ankle joint.

Topology of a slice, as radiologists see it and as Dafne's leg model segments it:

* skin, then a ring of subcutaneous fat, then the deep (crural) fascia;
* tibia anteromedial with its medial surface and crest directly under the fat;
* fibula lateral and a little posterior; the interosseous membrane joins them;
* anterior compartment in front of the membrane: tibialis anterior next to the tibia, extensor
  digitorum longus lateral to it; lateral compartment: peroneus around the fibula;
* superficial posterior compartment: the gastrocnemius heads (medial and lateral) under the fascia,
  the soleus deep to them; deep posterior compartment (flexors and tibialis posterior, *not* in
  Dafne's model, so unlabelled muscle) right behind the membrane; distally the extensor hallucis
  longus (unlabelled too) appears between tibialis anterior and extensor digitorum.

Neighbouring muscles are separated by one-pixel septa of fascia/fat, as on real images; these lines
are what makes the boundaries learnable, so they carry label 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from dafne_node.model.labels import LEG_MUSCLES, label_by_key

LOGGER = logging.getLogger(__name__)

SOLEUS = label_by_key("soleus").value
GASTROC_MEDIAL = label_by_key("gastrocnemius_medial").value
GASTROC_LATERAL = label_by_key("gastrocnemius_lateral").value
TIBIALIS_ANTERIOR = label_by_key("tibialis_anterior").value
EXTENSOR_DIGITORUM = label_by_key("extensor_digitorum_longus").value
PERONEUS = label_by_key("peroneus").value
DEEP_POSTERIOR = len(LEG_MUSCLES) + 1
"""Compartment id (not a label) of the deep posterior group: tibialis posterior and long flexors."""
EXTENSOR_HALLUCIS = len(LEG_MUSCLES) + 2
"""Compartment id (not a label) of the extensor hallucis longus, between TA and EDL distally."""


class Tissue(IntEnum):
    """Tissue classes of the phantom; a site protocol gives each one a signal."""

    AIR = 0
    SKIN = 1
    FAT = 2
    """Subcutaneous and intermuscular fat."""
    MUSCLE = 3
    """Any skeletal muscle: the six labelled ones and the unlabelled deep posterior group."""
    SEPTUM = 4
    """Fascia, intermuscular septa and the interosseous membrane (fibrous tissue with fat)."""
    CORTEX = 5
    MARROW = 6
    """Yellow (fatty) bone marrow."""
    TENDON = 7
    VESSEL = 8


N_THETA = 512
"""Angular resolution of the per-slice contour tables (0.7 degrees)."""

_THETA = (-np.pi + (np.arange(N_THETA) + 0.5) * (2 * np.pi / N_THETA)).astype(np.float64)
_K = np.arange(2, 6)
_FOURIER = np.exp(1j * _K[:, None] * _THETA[None, :])  # (K, N_THETA)

T_KNOTS = np.array([0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0])
"""Levels along the leg at which profiles are given; values in between are interpolated."""

# Canonical profiles along the leg (values at T_KNOTS), for an average adult; millimetres unless
# noted. They encode the anatomy that changes along the calf: the belly of the gastrocnemius is
# proximal, the soleus is largest at mid-calf, the tibia is wide at its metaphyses and has a thick
# triangular cortex at mid-shaft, and the distal leg is small, bony and tendinous.
PROFILES: dict[str, tuple[float, ...]] = {
    "radius": (44, 47, 48.5, 46, 40, 33, 27, 24),  # deep fascia (muscle envelope)
    "ellipticity": (0.07, 0.08, 0.08, 0.06, 0.04, 0.02, 0.0, 0.0),
    "posterior_bulge": (0.03, 0.05, 0.06, 0.05, 0.03, 0.01, 0.0, 0.0),
    "posterior_shift": (0.12, 0.15, 0.16, 0.15, 0.12, 0.08, 0.04, 0.02),
    "tibia_size": (21, 17, 13.5, 12, 12, 12.5, 14.5, 19),
    "tibia_triangle": (0.04, 0.09, 0.15, 0.16, 0.15, 0.1, 0.05, 0.02),
    "tibia_ml": (0.14, 0.1, 0.04, 0.0, 0.0, 0.02, 0.04, 0.06),
    "tibia_cortex": (0.1, 0.18, 0.34, 0.4, 0.38, 0.28, 0.16, 0.1),
    "tibia_u": (-0.1, -0.18, -0.25, -0.28, -0.28, -0.25, -0.2, -0.14),
    "fibula_size": (12, 9, 7.5, 7.2, 7, 7.2, 8.5, 11),
    "fibula_cortex": (0.2, 0.32, 0.4, 0.42, 0.42, 0.4, 0.3, 0.22),
    "fibula_u": (0.45, 0.5, 0.54, 0.55, 0.56, 0.58, 0.64, 0.7),
    "fibula_v": (0.26, 0.15, 0.06, 0.02, 0.0, -0.02, -0.06, -0.1),
    "gm_thick": (20, 25, 26, 23, 14, 4, 0, 0),
    "gl_thick": (15, 18, 18, 13, 5, 0, 0, 0),
    "soleus_thick": (40, 60, 90, 100, 100, 80, 30, 6),  # large: it fills what is left
    "achilles_thick": (0, 0, 0, 0.5, 2.5, 4, 5.5, 6.5),
    "ta_radius": (15, 18, 21, 21, 19, 14, 7, 1),
    "edl_radius": (10, 12, 14, 14, 13.5, 12, 9, 6),
    "peroneus_thick": (40, 40, 36, 30, 24, 16, 9, 4),
    "extensor_fill": (3.0, 3.0, 3.0, 2.2, 1.5, 1.15, 1.0, 1.0),  # presence margin, see TA/EDL
    "deep_size": (0.4, 0.34, 0.32, 0.33, 0.36, 0.4, 0.45, 0.45),  # fraction of "radius"
}


@dataclass(frozen=True, eq=False)
class LegModel:
    """The random shape of one leg: its profiles, contour harmonics and angles at T_KNOTS.

    Attributes
    ----------
    side:
        +1 for the left leg (image right), -1 for the right leg (image left): the sign that
        turns patient x into the lateral ``u`` axis.
    x_position:
        Patient x of the leg centre at t = 0 and its drift per unit t (mm): legs are never
        quite parallel to the magnet bore.
    table_y:
        Patient y (mm) of the table top that both calves rest on; it fixes where each leg's
        centre is and flattens the back of the calf.
    rotation:
        External rotation of the leg in radians at t = 0 and t = 1.
    profiles:
        Profile values at T_KNOTS, already scaled for this leg (see PROFILES).
    harmonics:
        Complex Fourier coefficients (k = 2..5) at T_KNOTS, shape (n_knots, 4), per contour
        ("outline" of the muscle envelope, "fat" thickness, "gastroc" and "soleus" depth);
        small numbers that make contours organic.
    bone_shape:
        Small random harmonics (k = 2, 3) of tibia and fibula at T_KNOTS, shape (n_knots, 2).
    angles:
        Septum, bone and gastrocnemius angles in radians (see ``_subject_angles``), and the
        bend and undulation of the septa (arrays).
    skin_mm, fat_mm, fat_over_tibia_mm:
        Skin thickness, typical subcutaneous fat thickness, and fat over the tibial crest.
    """

    side: int
    x_position: tuple[float, float]
    table_y: float
    rotation: tuple[float, float]
    profiles: dict[str, np.ndarray]
    harmonics: dict[str, np.ndarray]
    bone_shape: dict[str, np.ndarray]
    angles: dict[str, float | np.ndarray]
    skin_mm: float
    fat_mm: float
    fat_over_tibia_mm: float


@dataclass(frozen=True, eq=False)
class Subject:
    """A synthetic person: demographics that go into the DICOM header, and two legs."""

    sex: str
    age: int
    height_m: float
    weight_kg: float
    legs: tuple[LegModel, LegModel]
    """Right leg, left leg."""
    tibia_length_mm: float


@dataclass(frozen=True, eq=False)
class Build:
    """What the two legs of one subject share: body size, muscularity, fat, pose, shape."""

    size: float
    muscle: float
    fat_mm: float
    gap_mm: float
    table_y: float
    profiles: dict[str, np.ndarray]
    """The subject's profiles at T_KNOTS (PROFILES varied for this person)."""
    angles: dict[str, float]
    """The subject's septum and bone angles (see ``_subject_angles``)."""


ANGLE_ASYMMETRY = {
    "septum_anterior": np.deg2rad(2.0),
    "septum_posterior": np.deg2rad(2.0),
    "ta_edl_origin": 0.02,
    "ta_edl_angle": np.deg2rad(2.0),
    "gastroc_split": np.deg2rad(2.0),
    "gm_width": np.deg2rad(2.0),
    "gl_width": np.deg2rad(2.0),
    "tibia_apex": np.deg2rad(2.0),
    "tibia_sector": np.deg2rad(2.0),
}
"""Spread of each septum/bone angle between the two legs of one subject (radians or fraction)."""


def _subject_angles(rng: np.random.Generator) -> dict[str, float]:
    """Septum and bone orientation of a subject, shared (nearly) by both legs."""
    return {
        "septum_anterior": float(np.deg2rad(rng.normal(-68.0, 5.0))),
        "septum_posterior": float(np.deg2rad(rng.normal(42.0, 6.0))),
        "ta_edl_origin": float(rng.uniform(0.22, 0.36)),
        "ta_edl_angle": float(np.deg2rad(rng.normal(-80.0, 4.0))),
        "gastroc_split": float(np.deg2rad(rng.normal(88.0, 5.0))),
        "gm_width": float(np.deg2rad(rng.normal(80.0, 5.0))),
        "gl_width": float(np.deg2rad(rng.normal(62.0, 5.0))),
        "tibia_apex": float(np.deg2rad(rng.normal(-86.0, 4.0))),
        "tibia_sector": float(np.deg2rad(rng.normal(8.0, 5.0))),
    }


_ADDITIVE_PROFILES = ("tibia_u", "fibula_u", "fibula_v", "ellipticity", "posterior_bulge",
                      "posterior_shift")


def random_subject(rng: np.random.Generator) -> Subject:
    """Draw a subject; the two legs share the subject's build and vary independently around it.

    Why shared plus independent: left and right legs of one person are similar but never equal
    (a few per cent), and a segmentation model must cope with both the mirror image and the
    asymmetry; between people the variation is much larger.
    """
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(18, 80))
    male = sex == "M"
    height = float(rng.normal(1.78 if male else 1.65, 0.07))
    bmi = float(np.clip(rng.lognormal(np.log(24.5), 0.15), 17.5, 38.0))
    size = (height / 1.72) ** 0.8 * (bmi / 24.5) ** 0.35 * (1.03 if male else 0.97)
    muscle = float(np.clip(rng.normal(1.05 if male else 0.95, 0.08), 0.75, 1.3)) * (
        1.0 - 0.002 * max(age - 40, 0))
    build = Build(
        size=size,
        muscle=muscle,
        fat_mm=float(np.clip((bmi - 14.0) * (0.45 if male else 0.75), 2.0, 20.0)),
        gap_mm=float(rng.uniform(6.0, 24.0)),
        table_y=float(rng.uniform(48.0, 68.0)),
        profiles=_subject_profiles(rng, size, muscle),
        angles=_subject_angles(rng),
    )
    legs = (random_leg(rng, -1, build), random_leg(rng, +1, build))
    return Subject(
        sex=sex,
        age=age,
        height_m=round(height, 2),
        weight_kg=round(bmi * height * height, 1),
        legs=legs,
        tibia_length_mm=height * 1000.0 * 0.22,
    )


def _subject_profiles(rng: np.random.Generator, size: float, muscle: float
                      ) -> dict[str, np.ndarray]:
    """PROFILES scaled to the subject's size and muscles and varied along the leg."""
    scaled = {
        "radius": size * muscle**0.5,
        "tibia_size": size**0.6,
        "fibula_size": size**0.6,
        "gm_thick": muscle * rng.uniform(0.8, 1.2),
        "gl_thick": muscle * rng.uniform(0.75, 1.25),
        "soleus_thick": muscle * rng.uniform(0.85, 1.15),
        "ta_radius": muscle**0.7 * rng.uniform(0.9, 1.1),
        "edl_radius": muscle**0.7 * rng.uniform(0.85, 1.15),
        "peroneus_thick": muscle * rng.uniform(0.85, 1.15),
    }
    profiles: dict[str, np.ndarray] = {}
    for name, values in PROFILES.items():
        profile = np.asarray(values, dtype=np.float64) * scaled.get(name, 1.0)
        if name in _ADDITIVE_PROFILES:
            profile = profile + rng.normal(0.0, 0.015) + 0.01 * rng.normal(size=T_KNOTS.size)
        else:
            profile = profile * _smooth_jitter(rng, 0.03 if name == "radius" else 0.04)
        profiles[name] = profile
    # Where the gastrocnemius heads end varies a lot between people: stretch their profiles.
    for name, spread in (("gm_thick", 0.12), ("gl_thick", 0.12), ("achilles_thick", 0.1)):
        stretch = rng.uniform(1.0 - spread, 1.0 + spread)
        profiles[name] = np.interp(T_KNOTS / stretch, T_KNOTS, profiles[name])
    return profiles


def _smooth_jitter(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Multiplicative noise at T_KNOTS that is correlated between neighbouring knots."""
    raw = rng.normal(0.0, sigma, T_KNOTS.size + 2)
    return 1.0 + np.convolve(raw, np.array([0.25, 0.5, 0.25]), mode="valid") * 1.6


def _harmonics(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Fourier coefficients k = 2..5 that decay with k and drift along the leg."""
    scale = amplitude / _K**1.5
    base = scale * (rng.normal(size=_K.size) + 1j * rng.normal(size=_K.size))
    drift = scale * (rng.normal(size=(3, _K.size)) + 1j * rng.normal(size=(3, _K.size)))
    knots = np.linspace(0.0, 1.0, 3)
    along = np.stack(
        [np.interp(T_KNOTS, knots, drift[:, k].real) + 1j * np.interp(T_KNOTS, knots,
                                                                      drift[:, k].imag)
         for k in range(_K.size)],
        axis=1,
    )
    return base[None, :] + 0.6 * along


def random_leg(rng: np.random.Generator, side: int, build: Build) -> LegModel:
    """Draw one leg around the subject's build; ``side`` is -1 (right) or +1 (left).

    Sizes differ from the other leg by about 1-3 per cent; septum angles, contour harmonics and
    bone details are the leg's own.
    """
    profiles: dict[str, np.ndarray] = {}
    for name, shared in build.profiles.items():
        if name in _ADDITIVE_PROFILES:
            profiles[name] = shared + 0.004 * rng.normal(size=T_KNOTS.size)
        else:
            profiles[name] = shared * (_smooth_jitter(rng, 0.008 if name == "radius" else 0.02)
                                       * rng.normal(1.0, 0.01))
    x0 = side * (build.gap_mm / 2.0 + 56.0 * build.size + rng.normal(0.0, 2.0))
    angles = {name: value + rng.normal(0.0, ANGLE_ASYMMETRY[name])
              for name, value in build.angles.items()}
    angles["septum_bend"] = np.clip(rng.normal(0.0, 0.002, 3), -0.004, 0.004)
    angles["septum_wave"] = np.stack([rng.normal(0.0, 1.2, 3), rng.uniform(0.15, 0.3, 3),
                                      rng.uniform(0.0, 2 * np.pi, 3)], axis=1)
    angles["gastroc_twist"] = float(rng.normal(0.0, 1.0))
    fat = build.fat_mm * rng.normal(1.0, 0.06)
    return LegModel(
        side=side,
        x_position=(float(x0), float(side * rng.normal(3.0, 3.0))),
        table_y=build.table_y,
        rotation=(float(np.deg2rad(rng.normal(8.0, 5.0))), float(np.deg2rad(rng.normal(4.0, 4.0)))),
        profiles=profiles,
        harmonics={
            "outline": _harmonics(rng, 0.035),
            "fat": _harmonics(rng, 0.35),
            "gastroc": _harmonics(rng, 0.25),
            "soleus": _harmonics(rng, 0.3),
        },
        bone_shape={
            "tibia": 0.03 * (rng.normal(size=(T_KNOTS.size, 2)) + 1j * rng.normal(
                size=(T_KNOTS.size, 2))),
            "fibula": 0.05 * (rng.normal(size=(T_KNOTS.size, 2)) + 1j * rng.normal(
                size=(T_KNOTS.size, 2))),
        },
        angles=angles,
        skin_mm=float(rng.uniform(1.4, 2.2)),
        fat_mm=fat,
        fat_over_tibia_mm=float(np.clip(0.35 * fat, 1.5, 6.0)),
    )


# --- per-slice geometry (small arrays of shape (S,) or (S, N_THETA)) ---------------------------


def _along(t: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Interpolate values given at T_KNOTS (first axis) at the levels ``t``."""
    pos = np.clip(t, 0.0, 1.0)
    idx = np.clip(np.searchsorted(T_KNOTS, pos, side="right") - 1, 0, T_KNOTS.size - 2)
    frac = (pos - T_KNOTS[idx]) / (T_KNOTS[idx + 1] - T_KNOTS[idx])
    frac = frac.reshape(frac.shape + (1,) * (knots.ndim - 1))
    return knots[idx] * (1.0 - frac) + knots[idx + 1] * frac


def _bump(delta: np.ndarray, width: float | np.ndarray, power: float = 1.0) -> np.ndarray:
    """A smooth angular bump: 1 at delta = 0, 0 beyond |delta| >= width."""
    x = np.clip(np.abs(delta) / width, 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * x)) ** power


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Wrap angles to (-pi, pi]."""
    return np.angle(np.exp(1j * angle))


def _table_at(table: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Look up a per-slice angular table (S, N_THETA) at one angle per slice (S,)."""
    idx = np.clip(((theta + np.pi) * (N_THETA / (2 * np.pi))).astype(np.int64), 0, N_THETA - 1)
    return table[np.arange(table.shape[0]), idx]


def _fourier(coefficients: np.ndarray) -> np.ndarray:
    """Real part of sum_k c_k exp(i k theta) on the table angles, (S, K) -> (S, N_THETA).

    Written as a broadcast sum rather than a matrix product so that no BLAS thread pool is
    woken for a product this small.
    """
    return (coefficients[:, :, None] * _FOURIER[None, :, :]).sum(axis=1).real


def _unit(angle: np.ndarray) -> np.ndarray:
    """Unit vectors (S, 2) for angles (S,)."""
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def _bone_radius(shape: dict[str, np.ndarray], angle: np.ndarray) -> np.ndarray:
    """Polar radius of a bone (see ``_bone_coefficients``) in the directions ``angle`` (S,)."""
    c, s = np.cos(angle), np.sin(angle)
    c2, s2 = c * c - s * s, 2 * c * s
    c3, s3 = c2 * c - s2 * s, s2 * c + c2 * s
    return shape["size"] * (1 + shape["a2c"] * c2 + shape["a2s"] * s2 + shape["a3c"] * c3
                            + shape["a3s"] * s3)


def _bone_coefficients(size: np.ndarray, ml: np.ndarray, triangle: np.ndarray,
                       apex: np.ndarray | float, extra: np.ndarray) -> dict[str, np.ndarray]:
    """Coefficients of r(a) = size (1 + ml cos 2a + triangle cos 3(a - apex) + extra terms)."""
    return {
        "size": size,
        "a2c": ml + extra[:, 0].real,
        "a2s": extra[:, 0].imag,
        "a3c": triangle * np.cos(3 * apex) + extra[:, 1].real,
        "a3s": triangle * np.sin(3 * apex) + extra[:, 1].imag,
    }


@dataclass(frozen=True, eq=False)
class SliceGeometry:
    """Everything the voxel stage needs for S slices of one leg, as (S,) or (S, N_THETA) arrays."""

    center: np.ndarray  # (S, 2) patient x, y
    cos_rot: np.ndarray
    sin_rot: np.ndarray
    skin: np.ndarray  # (S, N) radius of the skin surface
    subcut: np.ndarray  # (S, N) inner radius of the skin
    fascia: np.ndarray  # (S, N) radius of the deep fascia
    gastroc: np.ndarray  # (S, N) thickness of the gastrocnemius layer under the fascia
    gastroc_label: np.ndarray  # (S, N) which head (label value) the layer belongs to
    soleus: np.ndarray  # (S, N) thickness of the soleus layer under the gastrocnemius
    achilles: np.ndarray  # (S, N) thickness of the tendon/aponeurosis under the fascia
    tibia: np.ndarray  # (S, 2) centre (u, v)
    tibia_shape: dict[str, np.ndarray]
    tibia_cortex: np.ndarray  # (S,) cortex thickness as a fraction of the radius
    tibia_sector: np.ndarray  # (S, 2, 2) directions bounding the subcutaneous surface
    fibula: np.ndarray  # (S, 2)
    fibula_shape: dict[str, np.ndarray]
    fibula_cortex: np.ndarray
    septa: np.ndarray  # (S, 4, 2) directions: membrane, TA|EDL, anterior and posterior septum
    split_origin: np.ndarray  # (S, 2) where the TA|EDL septum leaves the membrane
    septum_bend: np.ndarray  # (3,) curvature of the TA|EDL, anterior and posterior septa
    septum_wave: np.ndarray  # (3, 3) undulation of those septa: amplitude, frequency, phase
    gastroc_twist: float  # angular drift (table bins per mm of depth) of the GM|GL septum
    ta: np.ndarray  # (S, 3) centre u, v and radius of the tibialis anterior belly
    edl: np.ndarray  # (S, 3)
    peroneus: np.ndarray  # (S,) reach of the peroneal muscles beyond the fibula
    deep: np.ndarray  # (S,) reach of the deep posterior group from the tibia-fibula line
    vessels: np.ndarray  # (S, V, 3) centre u, v and radius of vessels


def slice_geometry(leg: LegModel, t: np.ndarray) -> SliceGeometry:
    """Evaluate a leg's shape at the levels ``t`` (S,).

    Order matters: the deep fascia (the muscle envelope) comes first, the tibia is placed with its
    crest just through it, the fat and skin are laid on top, and the fibula and septa are placed
    inside the envelope.
    """
    prof = {name: _along(t, values) for name, values in leg.profiles.items()}
    harm = {name: _along(t, values) for name, values in leg.harmonics.items()}
    ang = leg.angles
    radius = prof["radius"]
    rot = leg.rotation[0] + (leg.rotation[1] - leg.rotation[0]) * np.clip(t, 0, 1)

    theta = _THETA[None, :]
    fascia = radius[:, None] * (
        1.0
        - prof["ellipticity"][:, None] * np.cos(2 * theta)
        + prof["posterior_bulge"][:, None] * np.clip(np.sin(theta), 0, None) ** 3
        + prof["posterior_shift"][:, None] * np.sin(theta)
        + _fourier(harm["outline"])
    )
    apex = ang["tibia_apex"]
    tibia_shape = _bone_coefficients(prof["tibia_size"], prof["tibia_ml"],
                                     prof["tibia_triangle"], apex,
                                     _along(t, leg.bone_shape["tibia"]))
    tibia, crest_dir = _place_tibia(prof["tibia_u"] * radius, tibia_shape, apex, fascia)

    fat = leg.fat_mm * (1.0 + 0.25 * np.cos(theta - np.deg2rad(140.0))) * (
        1.0 + _fourier(harm["fat"]))
    over_tibia = _bump(_wrap(theta - crest_dir[:, None]), np.deg2rad(50.0))
    fat = np.maximum(fat * (1.0 - over_tibia) + leg.fat_over_tibia_mm * over_tibia, 1.0)
    skin = fascia + fat + leg.skin_mm
    # Lying supine flattens the back of the calf against the table (soft minimum); the table
    # is horizontal in the patient frame, so its direction in the leg frame turns with the leg.
    down = np.pi / 2 - rot
    table = 0.95 * _table_at(skin, down)
    towards = np.clip(np.cos(theta - down[:, None]), 1e-3, None)
    skin = -3.0 * np.logaddexp(-skin / 3.0, -table[:, None] / towards / 3.0)
    center = np.stack([leg.x_position[0] + leg.x_position[1] * np.clip(t, 0, 1),
                       leg.table_y - table], axis=1)
    subcut = skin - leg.skin_mm
    fascia = np.minimum(fascia, subcut - 1.0)
    fat = subcut - fascia

    fibula_shape = _bone_coefficients(prof["fibula_size"], np.zeros_like(t),
                                      np.full_like(t, 0.08), np.deg2rad(-60.0),
                                      _along(t, leg.bone_shape["fibula"]))
    fibula = _place_fibula(prof, fascia, tibia, tibia_shape, fibula_shape)

    septa, split_origin, sector = _septa(ang, tibia, tibia_shape, fibula, t.size)
    gastroc, gastroc_label, soleus, achilles = _posterior_layers(prof, ang, harm)
    return SliceGeometry(
        center=center,
        cos_rot=np.cos(rot),
        sin_rot=np.sin(rot),
        skin=skin,
        subcut=subcut,
        fascia=fascia,
        gastroc=gastroc,
        gastroc_label=gastroc_label,
        soleus=soleus,
        achilles=achilles,
        tibia=tibia,
        tibia_shape=tibia_shape,
        tibia_cortex=prof["tibia_cortex"],
        tibia_sector=sector,
        fibula=fibula,
        fibula_shape=fibula_shape,
        fibula_cortex=prof["fibula_cortex"],
        septa=septa,
        split_origin=split_origin,
        septum_bend=np.asarray(ang["septum_bend"]),
        septum_wave=np.asarray(ang["septum_wave"]),
        gastroc_twist=float(ang["gastroc_twist"]),
        ta=_tibialis_anterior(prof, tibia, tibia_shape, apex),
        edl=_extensor(prof, fibula, fibula_shape, septa),
        peroneus=prof["peroneus_thick"],
        deep=prof["deep_size"] * radius,
        vessels=_vessels(tibia, tibia_shape, fibula, septa=septa, subcut=subcut, fat=fat),
    )


def _place_tibia(tib_u: np.ndarray, shape: dict[str, np.ndarray], apex: float,
                 fascia: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of the tibia so that its crest pokes 1 mm through the fascia; and the crest angle.

    The anteromedial tibia has no muscle over it, so its crest must reach the fat layer.
    """
    apex_r = _bone_radius(shape, np.full_like(tib_u, apex))
    crest_u = tib_u + apex_r * np.cos(apex)
    crest_v = -0.8 * _table_at(fascia, np.full_like(tib_u, -np.pi / 2))
    for _ in range(3):
        want = _table_at(fascia, np.arctan2(crest_v, crest_u)) + 1.0
        crest_v = -np.sqrt(np.clip(want**2 - crest_u**2, 1.0, None))
    centre = np.stack([tib_u, crest_v - apex_r * np.sin(apex)], axis=-1)
    return centre, np.arctan2(crest_v, crest_u)


def _place_fibula(prof: dict[str, np.ndarray], fascia: np.ndarray, tibia: np.ndarray,
                  tibia_shape: dict[str, np.ndarray], fibula_shape: dict[str, np.ndarray]
                  ) -> np.ndarray:
    """Put the fibula lateral to the tibia, clear of it and inside the muscle envelope.

    Its position is a fraction of the envelope radius in its direction, so that the lateral
    compartment keeps its share of the leg whatever the subject's size.
    """
    direction = np.arctan2(prof["fibula_v"], prof["fibula_u"])
    reach = np.hypot(prof["fibula_u"], prof["fibula_v"]) * _table_at(fascia, direction)
    fib = reach[:, None] * _unit(direction)
    fib_max = fibula_shape["size"] * 1.15
    offset = fib - tibia
    dist = np.hypot(offset[:, 0], offset[:, 1])
    need = tibia_shape["size"] * 1.25 + fib_max + 8.0
    fib = np.where((dist < need)[:, None], tibia + offset * (need / dist)[:, None], fib)
    reach = np.hypot(fib[:, 0], fib[:, 1])
    room = _table_at(fascia, np.arctan2(fib[:, 1], fib[:, 0])) - fib_max + 1.0
    return fib * np.minimum(1.0, room / reach)[:, None]


def _septa(ang: dict[str, float], tibia: np.ndarray, tibia_shape: dict[str, np.ndarray],
           fibula: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Septum directions, where the TA|EDL septum starts, and the tibia's subcutaneous sector.

    The interosseous membrane runs from the fibula to the tibia's interosseous (posterolateral)
    border; the anterior and posterior intermuscular septa run from the fibula to the fascia; the
    septum between tibialis anterior and extensor digitorum rises from the membrane near the
    fibula and runs forwards to the fascia.
    """
    apex = ang["tibia_apex"]
    lateral_corner = np.full(n, apex + 2 * np.pi / 3)
    corner = tibia + _bone_radius(tibia_shape, lateral_corner)[:, None] * _unit(lateral_corner)
    membrane = np.arctan2(corner[:, 1] - fibula[:, 1], corner[:, 0] - fibula[:, 0])
    anterior = np.full(n, ang["septum_anterior"])
    # The TA|EDL septum runs forwards, a little laterally, and never closer than 14 degrees to
    # the anterior septum, so that the EDL keeps its share.
    split = np.full(n, min(ang["ta_edl_angle"], ang["septum_anterior"] - np.deg2rad(14.0)))
    split_origin = fibula + ang["ta_edl_origin"] * (corner - fibula)
    posterior = np.full(n, ang["septum_posterior"])
    septa = np.stack([_unit(membrane), _unit(split), _unit(anterior), _unit(posterior)], axis=1)
    # The medial surface, from the posteromedial border round to the crest, lies under the fat.
    start = np.full(n, apex - 2 * np.pi / 3 + ang["tibia_sector"])
    stop = np.full(n, apex - np.deg2rad(4.0))
    sector = np.stack([_unit(start), _unit(stop)], axis=1)
    return septa, split_origin, sector


def _posterior_layers(prof: dict[str, np.ndarray], ang: dict[str, float],
                      harm: dict[str, np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Angular thickness tables of the gastrocnemius heads, soleus and Achilles aponeurosis.

    The heads are crescents under the posterior fascia, thickest a little away from the midline
    where they meet; the soleus is a broader, deeper crescent.
    """
    delta = _wrap(_THETA[None, :] - ang["gastroc_split"])
    medial = delta > 0
    width = np.where(medial, ang["gm_width"], ang["gl_width"])
    x = np.clip(np.abs(delta) / width, 0.0, 1.0)
    shape = ((1.0 - x) ** 0.7 * (x + 0.35) ** 0.5) / 0.78
    # Blend the two heads' thickness across the split so the soleus border has no step.
    towards_gm = 1.0 / (1.0 + np.exp(-delta / np.deg2rad(8.0)))
    thick = prof["gl_thick"][:, None] + (prof["gm_thick"] - prof["gl_thick"])[:, None] * towards_gm
    wobble = 1.0 + _fourier(harm["gastroc"])
    gastroc = np.clip(thick * shape * wobble, 0.0, None)
    gastroc[gastroc < 2.0] = 0.0  # a head ends, it does not fray into slivers
    label = np.where(medial, GASTROC_MEDIAL, GASTROC_LATERAL).astype(np.uint8)
    label = np.broadcast_to(label, gastroc.shape)
    sol_delta = _wrap(_THETA[None, :] - np.deg2rad(95.0))
    soleus = prof["soleus_thick"][:, None] * (0.3 + 0.7 * _bump(sol_delta, np.pi, 0.35)) * (
        1.0 + _fourier(harm["soleus"]))
    achilles = prof["achilles_thick"][:, None] * _bump(delta, np.deg2rad(32.0), 0.3)
    return gastroc, label, np.clip(soleus, 0.0, None), achilles


def _tibialis_anterior(prof: dict[str, np.ndarray], tibia: np.ndarray,
                       tibia_shape: dict[str, np.ndarray], apex: float) -> np.ndarray:
    """Belly of the tibialis anterior, against the lateral surface of the tibia."""
    face = np.full(tibia.shape[0], apex + np.deg2rad(62.0))
    surface = tibia + _bone_radius(tibia_shape, face)[:, None] * _unit(face)
    r = prof["ta_radius"]
    centre = surface + (0.85 * r)[:, None] * _unit(face)
    return np.concatenate([centre, (r * prof["extensor_fill"])[:, None]], axis=1)


def _extensor(prof: dict[str, np.ndarray], fibula: np.ndarray,
              fibula_shape: dict[str, np.ndarray], septa: np.ndarray) -> np.ndarray:
    """Belly of the extensor digitorum longus, anterior to the fibula in its wedge."""
    mid = septa[:, 1] + septa[:, 2]
    mid = mid / np.linalg.norm(mid, axis=1, keepdims=True)
    r = prof["edl_radius"]
    centre = fibula + (fibula_shape["size"] + 0.9 * r)[:, None] * mid
    return np.concatenate([centre, (r * prof["extensor_fill"])[:, None]], axis=1)


def _vessels(tibia: np.ndarray, tibia_shape: dict[str, np.ndarray], fibula: np.ndarray, *,
             septa: np.ndarray, subcut: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """Anterior/posterior tibial vessels and the saphenous veins, as small discs."""
    n = tibia.shape[0]
    membrane = septa[:, 0]  # from the fibula towards the tibia, i.e. anteromedially
    normal = np.stack([-membrane[:, 1], membrane[:, 0]], axis=1)  # rotated +90: anterior
    span = np.hypot(*(fibula - tibia).T)
    ant_tibial = fibula + membrane * (0.55 * span)[:, None] + 2.5 * normal
    post_tibial = tibia + np.stack([np.full(n, 3.0), tibia_shape["size"] + 9.0], axis=1)
    vessels = [np.concatenate([ant_tibial, np.full((n, 1), 2.0)], axis=1),
               np.concatenate([post_tibial, np.full((n, 1), 2.2)], axis=1)]
    for angle, size in ((np.deg2rad(165.0), 2.6), (np.deg2rad(95.0), 1.8)):
        j = int((angle + np.pi) / (2 * np.pi) * N_THETA)
        depth = subcut[:, j] - 0.5 * fat[:, j]
        pos = np.stack([depth * np.cos(angle), depth * np.sin(angle)], axis=1)
        visible = fat[:, j] > 2 * size + 1.0
        vessels.append(np.concatenate([pos, np.where(visible, size, 0.0)[:, None]], axis=1))
    return np.stack(vessels, axis=1)


# --- voxel stage: (S, H, W) arrays of one leg's crop ---------------------------------------------


def _gather(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Per-voxel lookup of an angular table (S, N_THETA) with flat indices from ``_theta_index``."""
    return np.take(table.astype(np.float32, copy=False).ravel(), index)


def _cross(direction: np.ndarray, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """The z of (direction x d): positive when d lies counter-clockwise of the direction (S,2)."""
    return direction[:, 0, None, None] * dv - direction[:, 1, None, None] * du


def _bent(direction: np.ndarray, du: np.ndarray, dv: np.ndarray, rho: np.ndarray, *,
          bend: float, wave: np.ndarray) -> np.ndarray:
    """Like ``_cross`` but the septum line curves and undulates, as real septa do.

    ``rho`` is the distance from the fibula (close to the distance along the septum);
    ``bend`` bows the line into a parabola (per millimetre); ``wave`` is (amplitude mm,
    radians per mm, phase) of a gentle undulation along it.
    """
    undulation = np.float32(wave[0]) * np.sin(np.float32(wave[1]) * rho + np.float32(wave[2]))
    return _cross(direction, du, dv) + np.float32(bend) * rho * rho + undulation


def _col(values: np.ndarray) -> np.ndarray:
    """(S,) -> (S, 1, 1) float32 for broadcasting against voxel arrays."""
    return values.astype(np.float32)[:, None, None]


def _bone(geo_shape: dict[str, np.ndarray], centre: np.ndarray, cortex: np.ndarray,
          u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks (bone, marrow) of a bone whose polar radius is given by ``_bone_coefficients``."""
    du = u - _col(centre[:, 0])
    dv = v - _col(centre[:, 1])
    rho = np.hypot(du, dv) + np.float32(1e-3)
    c, s = du / rho, dv / rho
    c2, s2 = c * c - s * s, 2 * c * s
    c3, s3 = c2 * c - s2 * s, s2 * c + c2 * s
    edge = _col(geo_shape["size"]) * (
        1 + _col(geo_shape["a2c"]) * c2 + _col(geo_shape["a2s"]) * s2
        + _col(geo_shape["a3c"]) * c3 + _col(geo_shape["a3s"]) * s3)
    bone = rho < edge
    marrow = rho < edge * _col(1.0 - cortex)
    return bone, marrow


def leg_maps(geo: SliceGeometry, side: int, x: np.ndarray, y: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and label maps of one leg on the grid ``x`` (W,) by ``y`` (H,), patient mm.

    Returns
    -------
    tissue, labels:
        uint8 arrays (S, H, W); labels are LEG_MUSCLES values, 0 elsewhere (septa included).
    """
    n = geo.center.shape[0]
    xr = (np.float32(side) * (x.astype(np.float32)[None, None, :] - _col(geo.center[:, 0])))
    yr = y.astype(np.float32)[None, :, None] - _col(geo.center[:, 1])
    cos_r, sin_r = _col(geo.cos_rot), _col(geo.sin_rot)
    u = cos_r * xr + sin_r * yr
    v = cos_r * yr - sin_r * xr
    r = np.hypot(u, v)
    theta_idx = np.clip(((np.arctan2(v, u) + np.pi) * np.float32(N_THETA / (2 * np.pi)))
                        .astype(np.int32), 0, N_THETA - 1)
    theta_idx += (np.arange(n, dtype=np.int32) * N_THETA)[:, None, None]

    tissue = np.zeros(u.shape, dtype=np.uint8)
    tissue[r < _gather(geo.skin, theta_idx)] = Tissue.SKIN
    tissue[r < _gather(geo.subcut, theta_idx)] = Tissue.FAT
    depth = _gather(geo.fascia, theta_idx) - r
    inside = depth > 0

    compartment = _compartments(geo, u, v, depth=depth, theta_idx=theta_idx, inside=inside)
    tissue[compartment > 0] = Tissue.MUSCLE
    labels = np.where(compartment <= len(LEG_MUSCLES), compartment, 0).astype(np.uint8)

    septum = _septum_lines(compartment)
    tissue[septum] = Tissue.SEPTUM
    labels[septum] = 0
    tendon = inside & (depth < _gather(geo.achilles, theta_idx)) & (v > 0) & (compartment == 0)
    tissue[tendon] = Tissue.TENDON
    for k in range(geo.vessels.shape[1]):
        box = _local_box(geo, side, geo.vessels[:, k, :2], 4.0, grid=(x, y))
        _draw_vessel(geo.vessels[:, k], u[box], v[box], tissue[box], labels[box])

    # Bones are small: evaluate them only in the box that can contain them.
    for centre, shape, cortex in ((geo.tibia, geo.tibia_shape, geo.tibia_cortex),
                                  (geo.fibula, geo.fibula_shape, geo.fibula_cortex)):
        box = _local_box(geo, side, centre, float(shape["size"].max()) * 1.6, grid=(x, y))
        bone, marrow = _bone(shape, centre, cortex, u[box], v[box])
        sub_tissue, sub_labels = tissue[box], labels[box]
        sub_tissue[bone] = Tissue.CORTEX
        sub_tissue[marrow] = Tissue.MARROW
        sub_labels[bone] = 0
    return tissue, labels


def _local_box(geo: SliceGeometry, side: int, centre: np.ndarray, radius: float, *,
               grid: tuple[np.ndarray, np.ndarray]) -> tuple[slice, slice, slice]:
    """Index box (all slices, rows, cols) of the grid (x, y) around a leg-frame point (S, 2)."""
    x, y = grid
    xr = geo.cos_rot * centre[:, 0] - geo.sin_rot * centre[:, 1]
    yr = geo.sin_rot * centre[:, 0] + geo.cos_rot * centre[:, 1]
    px = geo.center[:, 0] + side * xr
    py = geo.center[:, 1] + yr
    return (slice(None), _span(y, py.min() - radius, py.max() + radius),
            _span(x, px.min() - radius, px.max() + radius))


def _compartments(geo: SliceGeometry, u: np.ndarray, v: np.ndarray, *, depth: np.ndarray,
                  theta_idx: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Which muscle (label value, DEEP_POSTERIOR, or 0 for fat/bone) each voxel belongs to."""
    fu = u - _col(geo.fibula[:, 0])
    fv = v - _col(geo.fibula[:, 1])
    membrane, split, anterior, posterior = (geo.septa[:, i] for i in range(4))
    b_split, b_ant, b_post = (float(b) for b in geo.septum_bend)
    w_split, w_ant, w_post = geo.septum_wave
    # Wedges around the fibula, counter-clockwise: membrane, anterior septum, posterior
    # septum. A point is inside a wedge (< 180 degrees) when it lies counter-clockwise of the
    # first ray and clockwise of the second.
    rho = np.hypot(fu, fv)
    past_anterior = _bent(anterior, fu, fv, rho, bend=b_ant, wave=w_ant) >= 0
    front = (_cross(membrane, fu, fv) > 0) & ~past_anterior
    lateral = past_anterior & (_bent(posterior, fu, fv, rho, bend=b_post, wave=w_post) < 0)
    edl_side = _bent(split, u - _col(geo.split_origin[:, 0]), v - _col(geo.split_origin[:, 1]),
                     rho, bend=b_split, wave=w_split) >= 0

    tu = u - _col(geo.tibia[:, 0])
    tv = v - _col(geo.tibia[:, 1])
    start, stop = geo.tibia_sector[:, 0], geo.tibia_sector[:, 1]
    subcutaneous = (_cross(start, tu, tv) >= 0) & (_cross(stop, tu, tv) <= 0)
    muscle_zone = inside & ~subcutaneous

    out = np.zeros(u.shape, dtype=np.uint8)
    front &= muscle_zone
    ta_in = _ellipse(u, v, geo.ta[:, :2], geo.ta[:, 2:3] * np.array([1.3, 1.6]))
    edl_in = _ellipse(u, v, geo.edl[:, :2], geo.edl[:, 2:3] * np.array([1.2, 1.5]))
    out[front] = EXTENSOR_HALLUCIS
    out[front & ~edl_side & ta_in] = TIBIALIS_ANTERIOR
    out[front & edl_side & edl_in] = EXTENSOR_DIGITORUM
    per_reach = _col(geo.fibula_shape["size"] + geo.peroneus)
    out[muscle_zone & lateral & (rho < per_reach)] = PERONEUS

    back = muscle_zone & ~front & ~lateral
    gastroc = _gather(geo.gastroc, theta_idx)
    in_gastroc = back & (depth < gastroc)
    tendon = back & ~in_gastroc & (depth < _gather(geo.achilles, theta_idx))
    # The septum between the heads is not radial: it drifts sideways with depth.
    twisted = theta_idx[in_gastroc] + (depth[in_gastroc] * np.float32(geo.gastroc_twist)
                                       ).astype(np.int32)
    out[in_gastroc] = np.take(geo.gastroc_label.ravel(), twisted, mode="wrap")
    rest = back & ~in_gastroc & ~tendon
    behind_tibia = geo.tibia + np.stack(
        [np.zeros_like(geo.deep), 0.4 * geo.tibia_shape["size"]], axis=1)
    from_bones = _segment_distance(u, v, behind_tibia, geo.fibula) / _col(geo.deep)
    deep = rest & (from_bones < 1.0)
    soleus = rest & ~deep & (depth < gastroc + _gather(geo.soleus, theta_idx))
    # What is left next to the bones is deep muscle too; far from them it stays fat (distally,
    # the fat pad in front of the Achilles tendon).
    out[rest & ~soleus & (from_bones < 1.8)] = DEEP_POSTERIOR
    out[soleus] = SOLEUS
    return out


def _segment_distance(u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each voxel from the segment a-b (per slice (S, 2) end points)."""
    ab = b - a
    length2 = (ab * ab).sum(axis=1)
    du = u - _col(a[:, 0])
    dv = v - _col(a[:, 1])
    along = np.clip((du * _col(ab[:, 0]) + dv * _col(ab[:, 1])) / _col(length2), 0.0, 1.0)
    du -= along * _col(ab[:, 0])
    dv -= along * _col(ab[:, 1])
    return np.hypot(du, dv)


def _ellipse(u: np.ndarray, v: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Mask of the axis-aligned ellipse with per-slice centre (S, 2) and semi-axes (S, 2)."""
    du = (u - _col(centre[:, 0])) / _col(axes[:, 0])
    dv = (v - _col(centre[:, 1])) / _col(axes[:, 1])
    return du * du + dv * dv < 1.0


def _septum_lines(compartment: np.ndarray) -> np.ndarray:
    """One-pixel lines where two different muscles touch (the fascia between them)."""
    sep = np.zeros(compartment.shape, dtype=bool)
    a, b = compartment[:, :, :-1], compartment[:, :, 1:]
    sep[:, :, :-1] |= (a != b) & (a > 0) & (b > 0)
    a, b = compartment[:, :-1, :], compartment[:, 1:, :]
    sep[:, :-1, :] |= (a != b) & (a > 0) & (b > 0)
    return sep


def _draw_vessel(vessel: np.ndarray, u: np.ndarray, v: np.ndarray, tissue: np.ndarray,
                 labels: np.ndarray) -> None:
    """Paint one vessel disc, (S, 3) centre u, v and radius, into (views of) the maps."""
    du = u - _col(vessel[:, 0])
    dv = v - _col(vessel[:, 1])
    disc = du * du + dv * dv < _col(vessel[:, 2] ** 2)
    disc &= tissue != Tissue.AIR
    tissue[disc] = Tissue.VESSEL
    labels[disc] = 0


def cross_sections(subject: Subject, t: np.ndarray, x: np.ndarray, y: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and label maps of both legs for levels ``t`` (S,) on the grid ``x`` (W,), ``y`` (H,).

    Each leg is computed only on the rectangle of pixels that can contain it, which is about a
    quarter of the field of view; that is what keeps a 40-slice study well under a second.
    """
    shape = (t.size, y.size, x.size)
    tissue = np.zeros(shape, dtype=np.uint8)
    labels = np.zeros(shape, dtype=np.uint8)
    for leg in subject.legs:
        geo = slice_geometry(leg, t)
        reach = float(geo.skin.max()) + 2.0
        cols = _span(x, geo.center[:, 0].min() - reach, geo.center[:, 0].max() + reach)
        rows = _span(y, geo.center[:, 1].min() - reach, geo.center[:, 1].max() + reach)
        if cols.stop <= cols.start or rows.stop <= rows.start:
            LOGGER.warning("leg at x=%.0f mm lies outside the field of view", geo.center[0, 0])
            continue
        leg_tissue, leg_labels = leg_maps(geo, leg.side, x[cols], y[rows])
        body = leg_tissue != Tissue.AIR
        view_t = tissue[:, rows, cols]
        view_l = labels[:, rows, cols]
        view_t[body] = leg_tissue[body]
        view_l[body] = leg_labels[body]
    return tissue, labels


def _span(axis: np.ndarray, low: float, high: float) -> slice:
    """Index range of the (ascending) coordinates ``axis`` that fall within [low, high]."""
    return slice(int(np.searchsorted(axis, low)), int(np.searchsorted(axis, high, side="right")))
