"""From a subject's tissue maps to the stored pixel values of one site's MR series.

``make_study`` is the entry point: it draws the subject, cuts the slices the site's protocol
would acquire, renders them with the site's contrast, shading, noise and (site D) fat
infiltration, and derives the patient and UID identity that ``dicom.write_images`` writes.

Why every step is vectorised over the whole stack: training sets are built from hundreds of
studies, so one 40-slice study must cost a fraction of a second on one core.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass

import numpy as np

from dafne_node.model.labels import LEG_MUSCLES
from dafne_node.phantom.anatomy import Subject, Tissue, cross_sections, random_subject
from dafne_node.phantom.sites import SiteProtocol, get_site

LOGGER = logging.getLogger(__name__)

MID_LEVEL = 0.4
"""Level along the leg (0 knee, 1 ankle) at the centre of the slice stack: the calf belly."""

SEPTUM_MM = 1.1
"""Physical thickness of an intermuscular septum, for its partial-volume signal."""
MAX_SLICES = 512
MATRIX_RANGE = (32, 1024)
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dafne-node:phantom:v1")
_STUDY_EPOCH = dt.date(2024, 1, 8)

# How strongly each muscle is replaced by fat at the neuromuscular site, relative to the worst:
# the pattern of dystrophies and myopathies, posterior compartment first, tibialis anterior last.
INFILTRATION_PATTERN = {
    "soleus": 0.85, "gastrocnemius_medial": 1.0, "gastrocnemius_lateral": 0.7,
    "tibialis_anterior": 0.25, "extensor_digitorum_longus": 0.35, "peroneus": 0.6,
}
_UNLABELLED_MUSCLE_INFILTRATION = 0.45


@dataclass(frozen=True, eq=False)
class PhantomStudy:
    """One synthetic MR series of both calves with its ground truth.

    Slice ``k`` of every array is the slice at ``image_positions[k]``; slices ascend in z (from
    the ankle towards the knee), which is also the order of Instance Number. The arrays are
    read-only: the study is a value, copy an array to change it.

    Attributes
    ----------
    site, seed:
        The site letter and the seed the study was made from.
    pixels:
        (slices, rows, cols) uint16 stored values (``protocol.bits_stored`` bits).
    labels:
        (slices, rows, cols) uint8 label map, 0 background, 1..6 the LEG_MUSCLES values.
    tissues:
        (slices, rows, cols) uint8 ``Tissue`` map behind the pixels (muscle, fat, bone...).
    pixel_spacing:
        (row spacing, column spacing) in mm, DICOM Pixel Spacing order.
    slice_thickness, spacing_between_slices:
        In mm.
    image_positions:
        (slices, 3) Image Position (Patient) of each slice, mm, LPS.
    levels:
        (slices,) level along the leg of each slice, 0 just below the knee, 1 above the ankle.
    window:
        (centre, width) of a sensible display window.
    """

    site: str
    seed: int
    pixels: np.ndarray
    labels: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    spacing_between_slices: float
    tissues: np.ndarray
    image_positions: np.ndarray
    levels: np.ndarray
    window: tuple[float, float]
    protocol: SiteProtocol
    subject: Subject
    patient_name: str
    patient_id: str
    patient_birth_date: str
    study_date: str
    study_time: str
    study_id: str
    accession_number: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]

    @property
    def image_orientation(self) -> tuple[float, ...]:
        """Image Orientation (Patient): axial, rows along +x (patient left), columns along +y."""
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    @property
    def slice_locations(self) -> np.ndarray:
        """Slice Location of each slice (its z in mm)."""
        return self.image_positions[:, 2]

    @property
    def patient_age(self) -> str:
        """Patient's Age as an AS string, e.g. ``"047Y"``."""
        return f"{self.subject.age:03d}Y"


def _check_int(name: str, value: object, low: int, high: int) -> int:
    """Validate an integer parameter, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def make_study(site: str = "A", seed: int = 0, slices: int = 40, matrix: int | None = None,
               *, subject_seed: int | None = None) -> PhantomStudy:
    """Make one site's axial series of both calves of a synthetic subject.

    Parameters
    ----------
    site:
        "A".."D" (see ``sites.SITES``).
    seed:
        Study seed: the same (site, seed) always gives the identical study, UIDs included.
    slices:
        Number of axial slices, centred on the calf belly at the site's slice spacing.
    matrix:
        Square in-plane matrix overriding the site's; the field of view is kept, so the pixel
        spacing changes.
    subject_seed:
        Seed of the anatomy. By default it is derived from (site, seed), so every site scans its
        own patients; give the same value at several sites to scan one "travelling subject"
        with each protocol.

    Raises
    ------
    ValueError
        For an unknown site or an out-of-range seed, slices, matrix or subject_seed; the
        message names the parameter.
    """
    protocol = get_site(site)
    seed = _check_int("seed", seed, 0, 2**31 - 1)
    slices = _check_int("slices", slices, 1, MAX_SLICES)
    size = _check_int("matrix", protocol.matrix if matrix is None else matrix, *MATRIX_RANGE)
    if subject_seed is not None:
        subject_seed = _check_int("subject_seed", subject_seed, 0, 2**31 - 1)
    anatomy_entropy = ([0xDAF, 0, subject_seed] if subject_seed is not None
                       else [0xDAF, ord(site), seed])
    subject = random_subject(np.random.default_rng(anatomy_entropy))
    # Separate streams: the identity (dates, table position) must not depend on how many
    # random numbers rendering a given matrix and slice count consumed.
    identity_rng = np.random.default_rng([0xDAF, ord(site), seed, 2])
    rng = np.random.default_rng([0xDAF, ord(site), seed, 1])

    spacing = protocol.pixel_spacing(size)
    axis = -protocol.fov_mm / 2 + spacing / 2 + spacing * np.arange(size)
    z_centre = round(float(identity_rng.uniform(-40.0, 40.0)), 1)
    z = z_centre + protocol.spacing_mm * (np.arange(slices) - (slices - 1) / 2)
    levels = MID_LEVEL - (z - z_centre) / subject.tibia_length_mm
    if levels.min() < 0.0 or levels.max() > 1.0:
        LOGGER.warning("%d slices of %.1f mm reach beyond the calf (knee to ankle); the end "
                       "cross-sections are repeated there", slices, protocol.spacing_mm)
    tissues, labels = cross_sections(subject, levels, axis, axis)
    pixels = render_pixels(tissues, labels, protocol, rng, z_mm=z - z_centre, pixel_mm=spacing)
    positions = np.stack([np.full(slices, axis[0]), np.full(slices, axis[0]), z], axis=1)
    for array in (pixels, labels, tissues, positions, levels):
        array.flags.writeable = False
    return PhantomStudy(
        site=site,
        seed=seed,
        pixels=pixels,
        labels=labels,
        pixel_spacing=(spacing, spacing),
        slice_thickness=protocol.slice_thickness_mm,
        spacing_between_slices=protocol.spacing_mm,
        tissues=tissues,
        image_positions=positions,
        levels=levels,
        window=display_window(pixels, tissues),
        protocol=protocol,
        subject=subject,
        **_identity(site, seed, subject, identity_rng, slices=slices, matrix=size,
                    subject_seed=subject_seed),
    )


def _identity(site: str, seed: int, subject: Subject, rng: np.random.Generator, *,
              slices: int, matrix: int, subject_seed: int | None) -> dict[str, object]:
    """Patient, study and UID fields, all derived from (site, seed) and so reproducible.

    The series and instance UIDs also depend on the number of slices and the matrix, so two
    renderings of one study are two series and never share a SOP Instance UID.
    """
    date = _STUDY_EPOCH + dt.timedelta(days=int(rng.integers(0, 700)))
    birth = date - dt.timedelta(days=int(subject.age * 365.25 + rng.integers(1, 364)))
    minutes = int(rng.integers(7 * 60 + 30, 19 * 60))
    base = [site, str(seed)] + ([] if subject_seed is None else [f"subject-{subject_seed}"])
    series = [*base, str(slices), str(matrix)]
    return {
        "patient_name": f"Phantom^{site}{seed:04d}",
        "patient_id": f"DAFNE-{site}-{seed:04d}",
        "patient_birth_date": birth.strftime("%Y%m%d"),
        "study_date": date.strftime("%Y%m%d"),
        "study_time": f"{minutes // 60:02d}{minutes % 60:02d}{int(rng.integers(0, 60)):02d}",
        "study_id": f"{seed % 100000:05d}",
        "accession_number": f"{site}{seed:07d}",
        "study_instance_uid": derived_uid(*base, "study"),
        "frame_of_reference_uid": derived_uid(*base, "frame-of-reference"),
        "series_instance_uid": derived_uid(*series, "series"),
        "sop_instance_uids": tuple(derived_uid(*series, "sop", str(k)) for k in range(slices)),
    }


def derived_uid(*parts: str) -> str:
    """A UID under the 2.25 root from a name-based (SHA-1, version 5) UUID of ``parts``.

    Why not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with ``prefix=None``
    pydicom ignores the entropy and returns a random UUID, and a prefix of our own would need a
    registered root. PS3.5 B.2 allows any ISO/IEC 9834-8 UUID under 2.25, name-based included.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


# --- rendering -----------------------------------------------------------------------------------


def render_pixels(tissues: np.ndarray, labels: np.ndarray, protocol: SiteProtocol,
                  rng: np.random.Generator, *, z_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Stored uint16 values of the tissue maps under ``protocol``.

    Order follows the physics: tissue signal (with fat infiltration mixed into muscle), texture,
    the point-spread blur of the acquisition, coil shading, then complex Gaussian noise whose
    magnitude gives the Rician background of real magnitude images. Only the box around the
    legs is rendered in full; the air around it is pure (Rayleigh) noise, drawn directly.
    """
    lut = protocol.signals.lut()
    # A septum is about a millimetre thick but drawn one pixel wide: in coarser pixels it is
    # partial-volumed with the muscle around it.
    share = np.float32(np.clip(SEPTUM_MM / pixel_mm, 0.3, 1.0))
    lut[Tissue.SEPTUM] = share * lut[Tissue.SEPTUM] + (1 - share) * lut[Tissue.MUSCLE]
    scale = np.float32(protocol.max_value / float(lut.max()))
    sigma = np.float32(protocol.noise)
    top = 2**protocol.bits_stored - 1
    uniform = np.float32(1.0) - rng.random(tissues.shape, dtype=np.float32)
    floor = np.sqrt(np.float32(-2.0) * np.log(uniform)) * (sigma * scale)
    stored = np.minimum(np.rint(floor), top).astype(np.uint16)
    box = _body_box(tissues)
    if box is None:
        return stored
    _, rows, cols = tissues.shape
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[box[1]]
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[box[2]]
    image = _signal(tissues[box], labels[box], lut, protocol, rng)
    image *= bias_field(rng, y, x, z_mm, protocol.bias)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag) * scale
    stored[box] = np.clip(np.rint(magnitude), 0, top).astype(np.uint16)
    return stored


def _body_box(tissues: np.ndarray, margin: int = 3) -> tuple[slice, slice, slice] | None:
    """All slices and the rows/cols that contain tissue in any slice, plus a margin."""
    rows = np.flatnonzero(tissues.any(axis=(0, 2)))
    cols = np.flatnonzero(tissues.any(axis=(0, 1)))
    if rows.size == 0:
        return None
    return (slice(None), slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def _signal(tissues: np.ndarray, labels: np.ndarray, lut: np.ndarray, protocol: SiteProtocol,
            rng: np.random.Generator) -> np.ndarray:
    """Noise-free signal: tissue contrast, muscle texture, fat infiltration, acquisition blur."""
    image = lut[tissues]
    muscle = tissues == Tissue.MUSCLE
    per_muscle = (1.0 + rng.normal(0.0, 0.04, len(LEG_MUSCLES) + 1)).astype(np.float32)
    # Tissue texture: white multiplicative noise that the acquisition blur below correlates.
    texture = rng.standard_normal(image.shape, dtype=np.float32)
    image *= np.where(muscle, per_muscle[labels], np.float32(1.0)) * (
        1.0 + np.float32(0.06) * texture)
    if protocol.fat_infiltration > 0:
        fraction = fat_fraction(labels, tissues, protocol.fat_infiltration, rng)
        image += fraction * (lut[Tissue.FAT] - image)
    return _blur(image)


def fat_fraction(labels: np.ndarray, tissues: np.ndarray, worst: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Fraction of fat in each voxel of infiltrated muscle: streaky, marbled, patchy.

    Dystrophic muscle is replaced by fat unevenly: first as streaks along the septa and
    fascia, then as "moth-eaten" foci that merge into confluent areas, worse in some muscles
    (posterior compartment) than in others (tibialis anterior).
    """
    muscle = tissues == Tissue.MUSCLE
    severity = worst * rng.uniform(0.45, 1.0)
    per_label = np.full(len(LEG_MUSCLES) + 1, _UNLABELLED_MUSCLE_INFILTRATION, dtype=np.float32)
    for label in LEG_MUSCLES:
        per_label[label.value] = INFILTRATION_PATTERN[label.key] * rng.uniform(0.6, 1.2)
    # Multi-scale noise through a steep curve: scattered small foci that merge into confluent
    # areas where the coarse component is high.
    noise = smooth_noise(rng, labels.shape, 1.8) + 0.9 * smooth_noise(rng, labels.shape, 7.0)
    foci = 1.0 / (1.0 + np.exp(np.float32(-4.0) * (noise - np.float32(0.7))))
    # Streaks: fat spreading a few pixels into the muscle from every septum and fascia.
    fascia = (tissues == Tissue.SEPTUM) | (tissues == Tissue.FAT)
    streaks = _blur(_blur(fascia.astype(np.float32), 0.3), 0.3) * (1.0 + 0.6 * noise)
    amount = severity * per_label[labels] * (0.1 + 0.9 * foci + 1.2 * streaks)
    return np.where(muscle, np.clip(amount, 0.0, 0.95), np.float32(0.0)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: float) -> np.ndarray:
    """Zero-mean "value noise" that varies smoothly over ``cell`` pixels, per slice.

    A coarse random grid is interpolated with smoothstep weights, one axis at a time; that costs
    a few passes over the volume, far less than filtering a full-resolution random field.
    """
    n, rows, cols = shape
    coarse = rng.standard_normal((n, int(rows / cell) + 2, int(cols / cell) + 2),
                                 dtype=np.float32)
    r0, rw = _smoothstep_index(rows, cell)
    c0, cw = _smoothstep_index(cols, cell)
    along_rows = coarse[:, r0, :] * (1 - rw)[:, None] + coarse[:, r0 + 1, :] * rw[:, None]
    return along_rows[:, :, c0] * (1 - cw) + along_rows[:, :, c0 + 1] * cw


def _smoothstep_index(size: int, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Coarse index below each pixel and its smoothstep weight towards the next one."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) / np.float32(cell)
    index = pos.astype(np.int64)
    frac = pos - index
    return index, frac * frac * (3 - 2 * frac)


def _blur(image: np.ndarray, side: float = 0.18) -> np.ndarray:
    """Separable 3-tap in-plane blur: the partial-volume softness of a real acquisition."""
    centre, edge = np.float32(1.0 - 2 * side), np.float32(side)
    out = image * centre
    out[:, :, 1:] += edge * image[:, :, :-1]
    out[:, :, :-1] += edge * image[:, :, 1:]
    result = out * centre
    result[:, 1:, :] += edge * out[:, :-1, :]
    result[:, :-1, :] += edge * out[:, 1:, :]
    return result


def bias_field(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, z_mm: np.ndarray,
               strength: float) -> np.ndarray:
    """Smooth multiplicative coil shading exp(f), f a random low-order field of std ``strength``.

    ``y`` and ``x`` are the rows' and columns' positions scaled to [-1, 1] over the field of
    view. f combines a 2D quadratic in-plane term, a brightening towards the coil near the skin
    of both legs, and a slow change along z.
    """
    y = y[:, None]
    x = x[None, :]
    c = rng.normal(0.0, 1.0, 8).astype(np.float32)
    plane = (c[0] * x + c[1] * y + 0.8 * c[2] * x * x + 0.8 * c[3] * y * y + c[4] * x * y
             + 1.2 * np.abs(c[5]) * (np.abs(x) - 0.5) ** 2) / 2.0
    zn = (np.asarray(z_mm, dtype=np.float32) / 150.0)[:, None, None]
    field = plane[None, :, :] + 0.5 * c[6] * zn + 0.4 * c[7] * zn * x[None, :, :]
    # Normalised over the rendered box, so ``strength`` is the spread of the log-shading over
    # the legs whatever the random coefficients: site D is always visibly shaded.
    field -= field.mean()
    field *= np.float32(strength) / max(float(field.std()), 1e-6)
    return np.exp(field).astype(np.float32)


def display_window(pixels: np.ndarray, tissues: np.ndarray) -> tuple[float, float]:
    """Window (centre, width) from the body's 0.5 percentile to a little above its 99.8th.

    The headroom keeps the brightest tissue (fat, or muscle in a water image) from saturating.
    """
    body = pixels[tissues != Tissue.AIR][::5]
    if body.size == 0:
        return float(pixels.max()) / 2 + 0.5, float(pixels.max()) + 1.0
    low, high = np.percentile(body, [0.5, 99.8])
    high *= 1.1
    return round(float(low + high) / 2, 1), round(max(float(high - low), 1.0), 1)
