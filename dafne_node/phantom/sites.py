"""Acquisition protocols of the four synthetic hospitals ("sites") A to D.

Why four different protocols: federated learning exists because hospitals scan differently. A
model trained on site A's T1-weighted images must measurably lose accuracy on the others, and the
federation has to win it back. The sites therefore differ in every way real ones do: contrast
(which tissue is bright), resolution and field of view, slice thickness and gap, noise, coil
shading (bias field), patient population (fat infiltration at the neuromuscular centre D) and the
scaling of stored values. Each protocol also carries the header values a real scanner would write,
so the DICOM files look like what a PACS would send.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dafne_node.phantom.anatomy import Tissue


@dataclass(frozen=True)
class TissueSignals:
    """Relative signal of each tissue class for one contrast, before noise and shading.

    Values are relative to fat in a T1-weighted image (1.0); only their ratios matter.
    """

    air: float
    skin: float
    fat: float
    muscle: float
    septum: float
    cortex: float
    marrow: float
    tendon: float
    vessel: float

    def lut(self) -> np.ndarray:
        """Signals as a float32 lookup table indexed by ``Tissue`` value."""
        table = np.zeros(len(Tissue), dtype=np.float32)
        for tissue in Tissue:
            table[tissue] = getattr(self, tissue.name.lower())
        return table


@dataclass(frozen=True)
class SiteProtocol:
    """One hospital's leg MRI protocol and scanner.

    Attributes
    ----------
    site:
        "A".."D".
    contrast:
        Short name of the weighting ("T1W", "T2W", "DIXON_W").
    signals:
        Tissue signals for this contrast.
    matrix:
        Default in-plane acquisition/reconstruction matrix (square).
    fov_mm:
        Square in-plane field of view in millimetres.
    slice_thickness_mm, spacing_mm:
        Slice thickness and centre-to-centre spacing (spacing > thickness means a gap).
    noise:
        Standard deviation of the complex Gaussian noise, relative to the fat signal of site A.
    bias:
        Standard deviation of the log of the smooth multiplicative bias field over the legs
        (0: none; 0.35: strong coil shading, brightest region about twice the darkest).
    fat_infiltration:
        Largest fraction of fat replacing muscle in the worst-affected muscle (0: healthy cohort).
    max_value:
        Stored value that the brightest tissue maps to (scanners scale differently).
    bits_stored:
        Bits Stored of the pixel data.
    manufacturer, model, field_strength_t, protocol_name, series_description:
        Header strings and values of the scanner and protocol.
    scanning_sequence, sequence_variant, scan_options, acquisition_type, sequence_name:
        MR Image module attributes (defined terms of PS3.3 C.8.3.1).
    repetition_time_ms, echo_time_ms, echo_train_length, flip_angle_deg:
        Timing, plausible for the contrast.
    image_type:
        Image Type values 3 and 4 (after ORIGINAL and PRIMARY); value 3 is a PS3.3 defined
        term, value 4 the vendor's own (ND = not distortion corrected, WATER = Dixon water).
    """

    site: str
    contrast: str
    signals: TissueSignals
    matrix: int
    fov_mm: float
    slice_thickness_mm: float
    spacing_mm: float
    noise: float
    bias: float
    fat_infiltration: float
    max_value: int
    manufacturer: str
    model: str
    field_strength_t: float
    protocol_name: str
    series_description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    acquisition_type: str
    sequence_name: str
    repetition_time_ms: float
    echo_time_ms: float
    echo_train_length: int
    flip_angle_deg: float
    image_type: tuple[str, str] = ("OTHER", "ND")
    bits_stored: int = 12

    def __post_init__(self) -> None:
        """Reject protocols that could not be acquired, naming the attribute."""
        if self.matrix < 32:
            raise ValueError(f"matrix must be at least 32, got {self.matrix}")
        for name in ("fov_mm", "slice_thickness_mm", "spacing_mm", "repetition_time_ms",
                     "echo_time_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_value >= 2**self.bits_stored:
            raise ValueError(f"max_value {self.max_value} does not fit bits_stored "
                             f"{self.bits_stored}")

    def pixel_spacing(self, matrix: int | None = None) -> float:
        """In-plane pixel size in mm for ``matrix`` (default: the protocol's own)."""
        return self.fov_mm / (matrix or self.matrix)


T1_SIGNALS = TissueSignals(air=0.0, skin=0.5, fat=1.0, muscle=0.36, septum=0.75, cortex=0.03,
                           marrow=0.92, tendon=0.05, vessel=0.12)
"""Spin-echo T1: fat and marrow bright, muscle intermediate grey, cortex and tendon black."""

T2_SIGNALS = TissueSignals(air=0.0, skin=0.3, fat=0.8, muscle=0.15, septum=0.5, cortex=0.02,
                           marrow=0.7, tendon=0.03, vessel=0.75)
"""Turbo spin-echo T2: fat still bright, muscle dark, slow-flowing veins bright."""

DIXON_WATER_SIGNALS = TissueSignals(air=0.0, skin=0.55, fat=0.07, muscle=0.72, septum=0.22,
                                    cortex=0.03, marrow=0.1, tendon=0.06, vessel=0.85)
"""Dixon water image: fat and marrow suppressed, muscle bright, vessels bright (inflow)."""

SITES: dict[str, SiteProtocol] = {
    "A": SiteProtocol(
        site="A", contrast="T1W", signals=T1_SIGNALS,
        matrix=256, fov_mm=320.0, slice_thickness_mm=5.0, spacing_mm=6.0,
        noise=0.02, bias=0.08, fat_infiltration=0.0, max_value=2000,
        manufacturer="SIEMENS", model="MAGNETOM Skyra", field_strength_t=3.0,
        protocol_name="LEG_T1_TSE_TRA", series_description="t1_tse_tra_legs",
        scanning_sequence=("SE",), sequence_variant=("SK", "SP"), scan_options=("PFP",),
        acquisition_type="2D", sequence_name="*tse2d1_3",
        repetition_time_ms=650.0, echo_time_ms=11.0, echo_train_length=3, flip_angle_deg=150.0,
    ),
    "B": SiteProtocol(
        site="B", contrast="T2W", signals=T2_SIGNALS,
        matrix=288, fov_mm=360.0, slice_thickness_mm=6.0, spacing_mm=7.0,
        noise=0.035, bias=0.12, fat_infiltration=0.0, max_value=3200,
        manufacturer="GE MEDICAL SYSTEMS", model="SIGNA Premier", field_strength_t=3.0,
        protocol_name="CALF AX T2 FSE", series_description="Ax T2 FSE both calves",
        scanning_sequence=("SE",), sequence_variant=("SK",), scan_options=("FC",),
        acquisition_type="2D", sequence_name="fse-xl_208",
        repetition_time_ms=4200.0, echo_time_ms=85.0, echo_train_length=16,
        flip_angle_deg=111.0,
    ),
    "C": SiteProtocol(
        site="C", contrast="DIXON_W", signals=DIXON_WATER_SIGNALS,
        matrix=192, fov_mm=400.0, slice_thickness_mm=5.0, spacing_mm=5.0,
        noise=0.025, bias=0.15, fat_infiltration=0.0, max_value=1200,
        manufacturer="Philips Medical Systems", model="Ingenia", field_strength_t=1.5,
        protocol_name="mDIXON legs", series_description="mDIXON_W",
        scanning_sequence=("GR",), sequence_variant=("SP", "SS"), scan_options=(),
        acquisition_type="3D", sequence_name="T1FFE",
        repetition_time_ms=6.5, echo_time_ms=2.3, echo_train_length=2, flip_angle_deg=10.0,
        image_type=("OTHER", "WATER"),
    ),
    "D": SiteProtocol(
        site="D", contrast="T1W", signals=TissueSignals(
            air=0.0, skin=0.45, fat=1.0, muscle=0.42, septum=0.8, cortex=0.04, marrow=0.9,
            tendon=0.06, vessel=0.15),
        matrix=256, fov_mm=300.0, slice_thickness_mm=5.0, spacing_mm=5.5,
        noise=0.055, bias=0.35, fat_infiltration=0.6, max_value=1600,
        manufacturer="Canon Medical Systems", model="Vantage Orian", field_strength_t=1.5,
        protocol_name="NMD calf T1 FSE", series_description="T1 FSE AX calves",
        scanning_sequence=("SE",), sequence_variant=("SK",), scan_options=(),
        acquisition_type="2D", sequence_name="FSE",
        repetition_time_ms=560.0, echo_time_ms=14.0, echo_train_length=4, flip_angle_deg=90.0,
    ),
}
"""The four sites' protocols, keyed by site letter."""


def get_site(site: str) -> SiteProtocol:
    """Return the protocol of ``site``.

    Raises
    ------
    ValueError
        If ``site`` is not one of SITES; the message names the parameter and the valid sites.
    """
    try:
        return SITES[site]
    except (KeyError, TypeError):
        valid = ", ".join(SITES)
        raise ValueError(f"site must be one of {valid}, got {site!r}") from None

