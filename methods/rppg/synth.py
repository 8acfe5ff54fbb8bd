"""Synthetic face videos with a known pulse (spec section 6, our procedural generator).

Each video follows the POS skin-reflection model (Wang et al. 2017):
``C(t) = I(t) * (u_s s(t) + albedo * (1 + a p(t) u_p)) + noise``.

* **Face.** A face image from scikit-image's ``lfw_subset``, colourised with a skin tone, on a
  grey background. The skin mask is an ellipse over the face.
* **Pulse.** ``neurokit2.ppg_simulate`` at the video's heart rate, with heart-rate variability.
  It modulates the skin pixels along the blood-volume direction ``u_p ~ [0.33, 0.77, 0.53]``, with
  an AC/DC ratio ``a`` and a perfusion map (stronger on forehead and cheeks).
* **Nuisances.** Illumination drift and flicker ``I(t)``, a specular term tied to the motion,
  smooth random translation, Gaussian sensor noise and 8-bit quantisation. Off by default (so
  the domains that do not use them give the same videos as before), the nuisances that make the
  classical methods fail on real videos: head motion (rotation, scale, translation with an
  in-band jitter), non-rigid motion of the lower face (talking), a shading gradient that turns
  with the head, and coloured light changes (a screen in front of the face) that reach the
  background less than the face.
* **Label.** The label wave is the same pulse shifted by a per-video delay (the "uncertain
  delay" of BYHE): ``label(t) = p(t - delay)``, 0-0.5 s by default.
* **Domains** (``Domain``) differ in their skin tone, lighting, motion and delay ranges.

Everything is seeded; 30 fps by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Tuple

import numpy as np

from methods.common.optional import requires

U_P = np.array([0.33, 0.77, 0.53]) / np.linalg.norm([0.33, 0.77, 0.53])  # blood-volume pulse direction
SKIN_TONES = {  # CHROM-style skin colour directions (light ... dark), scaled to [0, 1] albedo
    "light": np.array([0.92, 0.72, 0.62]),
    "medium": np.array([0.78, 0.55, 0.42]),
    "tan": np.array([0.64, 0.44, 0.32]),
    "dark": np.array([0.42, 0.28, 0.20]),
}


@dataclass
class Domain:
    name: str = "default"
    skin_tones: Tuple[str, ...] = ("light", "medium", "tan", "dark")
    hr_range: Tuple[float, float] = (50.0, 140.0)  # bpm
    delay_range: Tuple[float, float] = (0.0, 0.5)  # s, label behind the video
    ac_range: Tuple[float, float] = (0.004, 0.01)  # pulse AC/DC
    illumination_drift: float = 0.05  # relative amplitude of the slow drift
    flicker: float = 0.005  # relative amplitude of a periodic illumination flicker ...
    flicker_hz: Tuple[float, float] = (0.3, 0.6)  # ... at a frequency drawn from this range
    motion_px: float = 0.6  # amplitude of the smooth translation, pixels
    specular: float = 0.02
    noise_std: float = 1.0  # sensor noise, in 8-bit levels
    # the "in the wild" nuisances (0: off); drawn from their own generator, after the others
    rotation_deg: float = 0.0  # amplitude of the smooth in-plane head rotation, degrees
    scale: float = 0.0  # amplitude of the smooth relative head scale change (towards / away from the camera)
    jitter_px: float = 0.0  # amplitude of an in-band (0.7-3 Hz) head jitter (nodding, talking), pixels
    talk_px: float = 0.0  # amplitude of the lower-face (mouth, jaw) displacement while talking, pixels
    shading: float = 0.0  # strength of a side-light gradient across the frame whose direction follows the head
    colour_light: float = 0.0  # relative amplitude of coloured light changes (screen content), per channel
    colour_light_background: float = 0.3  # the share of the coloured light the background receives

    @property
    def wild(self) -> bool:
        return any(
            v > 0
            for v in (self.rotation_deg, self.scale, self.jitter_px, self.talk_px, self.shading, self.colour_light)
        )


DOMAINS: Dict[str, Domain] = {
    "default": Domain(),
    "no-delay": Domain(name="no-delay", delay_range=(0.0, 0.0)),
    "bright-still": Domain(
        name="bright-still", skin_tones=("light", "medium"), illumination_drift=0.02, motion_px=0.2, noise_std=0.5
    ),
    "dark-moving": Domain(
        name="dark-moving", skin_tones=("tan", "dark"), illumination_drift=0.1, motion_px=1.2, noise_std=2.0
    ),
    # the three domains of DOHA's leave-one-domain-out experiment
    "lab": Domain(
        name="lab",
        skin_tones=("light", "medium"),
        delay_range=(0.0, 0.2),
        illumination_drift=0.02,
        motion_px=0.3,
        noise_std=0.5,
    ),
    "flicker": Domain(
        name="flicker",
        skin_tones=("medium", "tan"),
        delay_range=(0.2, 0.5),
        flicker=0.008,
        flicker_hz=(0.7, 2.5),
        motion_px=0.8,
        noise_std=1.5,
    ),
    # between default and challenging: a weaker pulse, more motion and noise, the flicker below the band
    "moderate": Domain(
        name="moderate",
        ac_range=(0.002, 0.006),
        illumination_drift=0.1,
        flicker=0.01,
        motion_px=1.2,
        specular=0.03,
        noise_std=2.0,
    ),
    # weaker pulse, an in-band flicker 2-5x stronger than it, more motion and noise: the pulse must be told
    # from the illumination by its colour direction
    "challenging": Domain(
        name="challenging",
        ac_range=(0.002, 0.005),
        illumination_drift=0.1,
        flicker=0.01,
        flicker_hz=(0.7, 2.5),
        motion_px=1.5,
        specular=0.04,
        noise_std=3.0,
    ),
    # what defeats POS / CHROM on real videos (SSPD's acceptance): head rotation, scale and translation
    # with an in-band jitter, talking, a shading gradient that turns with the head, and a screen's coloured
    # light changes, stronger than the pulse, falling mostly on the face
    "wild": Domain(
        name="wild",
        ac_range=(0.003, 0.008),
        illumination_drift=0.1,
        motion_px=2.0,
        specular=0.04,
        noise_std=2.0,
        rotation_deg=8.0,
        scale=0.05,
        jitter_px=0.4,
        talk_px=1.5,
        shading=0.15,
        colour_light=0.01,
    ),
}


@lru_cache(maxsize=None)
def _faces() -> np.ndarray:
    with requires("methods"):
        from skimage import data

    return data.lfw_subset()[:100]  # (100, 25, 25) grey faces in [0, 1] (the rest are non-faces)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    with requires("methods"):
        from skimage.transform import resize

    return resize(img, (size, size), anti_aliasing=True)


def skin_mask(size: int) -> np.ndarray:
    """An ellipse over the face region (forehead, cheeks, chin) of a size x size frame."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    return (((xx - 0.5) / 0.32) ** 2 + ((yy - 0.52) / 0.42) ** 2) <= 1.0


def perfusion_map(size: int) -> np.ndarray:
    """Relative pulse strength: higher on the forehead and the cheeks, 0 off the skin."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    forehead = np.exp(-(((yy - 0.25) / 0.12) ** 2 + ((xx - 0.5) / 0.25) ** 2))
    cheeks = np.exp(-(((yy - 0.6) / 0.12) ** 2) - ((np.abs(xx - 0.5) - 0.22) / 0.1) ** 2)
    return (0.5 + forehead + cheeks) * skin_mask(size)


def pulse_wave(n: int, fs: float, hr: float, rng: np.random.Generator) -> np.ndarray:
    """A PPG wave of n samples at hr bpm (neurokit2's simulator), zero mean, unit std."""
    import warnings

    with requires("methods"):
        import neurokit2 as nk

    duration = int(np.ceil(n / fs)) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # neurokit2's interpolation notes
        w = nk.ppg_simulate(
            duration=duration,
            sampling_rate=int(round(fs)),
            heart_rate=hr,
            frequency_modulation=0.1,
            ibi_randomness=0.05,
            drift=0,
            motion_amplitude=0,
            powerline_amplitude=0,
            random_state=int(rng.integers(2**31)),
        )[:n]
    w = np.asarray(w, np.float64)
    return (w - w.mean()) / (w.std() + 1e-12)


def synth_video(
    n_frames: int = 300, size: int = 36, fs: float = 30.0, domain: Domain = Domain(), seed: int = 0, hr: float = None
) -> Dict[str, np.ndarray]:
    """One video: ``video`` (T, size, size, 3) float32 in [0, 1] (8-bit levels), ``label`` (T,)
    the delayed label wave, ``pulse`` (T,) the wave the skin carries, ``hr`` (bpm), ``delay`` (s),
    ``mask`` (size, size) the skin mask."""
    if n_frames < 2 or size < 8 or not fs > 0:
        raise ValueError(f"need n_frames >= 2, size >= 8 and fs > 0, got {n_frames}, {size}, {fs}")
    rng = np.random.default_rng(seed)
    hr = float(rng.uniform(*domain.hr_range)) if hr is None else float(hr)
    delay = float(rng.uniform(*domain.delay_range))
    shift = int(round(delay * fs))
    wave = pulse_wave(n_frames + shift, fs, hr, rng)
    p = wave[shift:]  # the video's pulse at frame t ...
    label = wave[:n_frames]  # ... the label lags it by `shift` frames: label(t) = p(t - delay)
    face = _resize(_faces()[int(rng.integers(len(_faces())))], size)
    tone = SKIN_TONES[domain.skin_tones[int(rng.integers(len(domain.skin_tones)))]]
    mask = skin_mask(size)
    albedo = np.where(mask[..., None], (0.55 + 0.45 * face[..., None]) * tone, 0.35 + 0.1 * face[..., None])
    perf = perfusion_map(size)[..., None]
    t = np.arange(n_frames) / fs
    ac = float(rng.uniform(*domain.ac_range))
    illum = (
        1
        + domain.illumination_drift * np.sin(2 * np.pi * rng.uniform(0.02, 0.08) * t + rng.uniform(0, 6.3))
        + domain.flicker * np.sin(2 * np.pi * rng.uniform(*domain.flicker_hz) * t)
    )
    # smooth translation: low-pass random walk
    steps = rng.standard_normal((n_frames, 2))
    kernel = np.hanning(31)
    motion = np.stack([np.convolve(steps[:, i], kernel / kernel.sum(), mode="same") for i in range(2)], 1)
    motion = domain.motion_px * motion / (np.abs(motion).max() + 1e-12)
    speed = np.r_[0.0, np.linalg.norm(np.diff(motion, axis=0), axis=1)]
    frames = np.empty((n_frames, size, size, 3), np.float32)
    with requires("methods"):
        from scipy.ndimage import shift as nd_shift

    wild = _WildMotion(domain, n_frames, size, fs, motion, seed) if domain.wild else None
    for i in range(n_frames):
        skin = albedo * (1 + ac * p[i] * perf / perf.max() * U_P / U_P.max())
        spec = domain.specular * (1 + 5 * speed[i]) * mask[..., None]
        img = illum[i] * (skin + spec)
        if wild is None:
            img = nd_shift(img, (motion[i, 0], motion[i, 1], 0), order=1, mode="nearest")
        else:
            img = wild.frame(img, i)
        img = img * 255 + rng.normal(0, domain.noise_std, img.shape)
        frames[i] = np.clip(np.round(img), 0, 255) / 255
    return {
        "video": frames,
        "label": label.astype(np.float32),
        "pulse": p.astype(np.float32),
        "hr": realized_hr(p, fs),
        "hr_target": hr,
        "delay": shift / fs,
        "mask": mask,
    }


def _smooth_noise(rng: np.random.Generator, n: int, fs: float, band: Tuple[float, float], k: int = 1) -> np.ndarray:
    """k random signals of n samples band-limited to ``band`` Hz (Fourier-domain mask), each scaled
    to a maximum |value| of 1: (n, k)."""
    spec = np.fft.rfft(rng.standard_normal((n, k)), axis=0)
    f = np.fft.rfftfreq(n, 1 / fs)
    spec[(f < band[0]) | (f > band[1])] = 0
    x = np.fft.irfft(spec, n, axis=0)
    return x / (np.abs(x).max(0) + 1e-12)


def _segments(rng: np.random.Generator, n: int, fs: float, seconds: Tuple[float, float]):
    """Consecutive slices covering n samples, each U(seconds) long (at least one sample); the
    caller's draws for a segment follow the draw of its length."""
    t = 0
    while t < n:
        length = max(1, int(rng.uniform(*seconds) * fs))
        yield slice(t, t + length)
        t += length


class _WildMotion:
    """The "in the wild" nuisances of one video (``Domain.wild``), from their own generator (so the
    other draws of ``synth_video`` are those of a domain without them):

    * head motion: a smooth in-plane rotation and scale change about the frame's centre, the
      domain's smooth translation, and an in-band (0.7-3 Hz) jitter;
    * talking: during random speech segments the lower face (mouth, jaw) moves down and back at
      2-6 Hz;
    * shading: a side-light gradient across the frame whose direction turns with the head;
    * coloured light: a screen's content changes the light's colour every 0.2-1.5 s (smoothed over
      0.1 s); the face gets all of it, the background ``colour_light_background`` of it.
    """

    def __init__(self, d: Domain, n: int, size: int, fs: float, motion: np.ndarray, seed: int):
        rng = np.random.default_rng([seed, 7919])
        slow = _smooth_noise(rng, n, fs, (0.0, 0.5), 2)
        self.angle = np.deg2rad(d.rotation_deg) * slow[:, 0]
        self.scale = 1 + d.scale * slow[:, 1]
        self.shift = motion + d.jitter_px * _smooth_noise(rng, n, fs, (0.7, 3.0), 2)
        talking = np.zeros(n)
        for seg in _segments(rng, n, fs, (1.0, 4.0)):  # silent and talking segments of 1-4 s
            if rng.random() < 0.5:
                talking[seg] = 1
        self.jaw = d.talk_px * talking * np.abs(_smooth_noise(rng, n, fs, (2.0, 6.0), 1)[:, 0])
        self.light_angle = rng.uniform(0, 2 * np.pi) + 3 * self.angle
        self.shading = d.shading
        colours = np.zeros((n, 3))
        for seg in _segments(rng, n, fs, (0.2, 1.5)):
            colours[seg] = rng.uniform(-1, 1, 3)
        kernel = np.hanning(max(3, int(0.1 * fs)) + 2)[1:-1]
        colours = np.stack([np.convolve(colours[:, c], kernel / kernel.sum(), mode="same") for c in range(3)], 1)
        self.light = d.colour_light * colours
        self.background = d.colour_light_background
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        self.yy, self.xx, self.c, self.size = yy, xx, (size - 1) / 2, size
        self.face = skin_mask(size).astype(np.float64)

    def _jaw_shape(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The talking displacement's profile at face coordinates (y, x) (pixels): a bump over
        mouth and jaw."""
        u, v = y / self.size, x / self.size
        return np.exp(-(((u - 0.78) / 0.1) ** 2) - ((v - 0.5) / 0.16) ** 2)

    def frame(self, img: np.ndarray, i: int) -> np.ndarray:
        with requires("methods"):
            from scipy.ndimage import map_coordinates

        # output pixel p comes from the face at R^-1 (p - c - shift) / scale + c, less the jaw's displacement
        cy, cx = self.yy - self.c - self.shift[i, 0], self.xx - self.c - self.shift[i, 1]
        ca, sa, s = np.cos(self.angle[i]), np.sin(self.angle[i]), self.scale[i]
        sy, sx = (ca * cy + sa * cx) / s + self.c, (-sa * cy + ca * cx) / s + self.c
        # the jaw moves with the face: its displacement is placed in face coordinates
        sy = sy - self.jaw[i] * self._jaw_shape(sy, sx)
        coords = np.stack([sy, sx])
        out = np.stack([map_coordinates(img[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
        face = map_coordinates(self.face, coords, order=1, mode="constant")[..., None]
        ang = self.light_angle[i]
        grad = ((self.yy - self.c) * np.sin(ang) + (self.xx - self.c) * np.cos(ang)) / (2 * self.c)
        light = (1 + self.shading * grad)[..., None] * (1 + self.light[i] * (face + self.background * (1 - face)))
        return out * light


def skin_mask_estimate(frame: np.ndarray) -> np.ndarray:
    """A skin mask estimated from one frame (H, W, 3) in [0, 1], as a classical pipeline without
    the true mask would: the pixels whose chroma falls in the YCbCr skin ranges of Chai & Ngan
    (1999): Cr in [133, 173] and Cb in [77, 127] (8-bit)."""
    rgb = np.asarray(frame, np.float64) * 255
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    return (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127)


def skin_signal_estimated(video: np.ndarray, min_pixels: int = 4) -> np.ndarray:
    """The mean colour per frame over each frame's estimated skin mask (``skin_mask_estimate``),
    (T, 3); a frame with fewer than ``min_pixels`` skin pixels keeps the previous frame's mask
    (the first such frame: the whole frame)."""
    out = np.empty((video.shape[0], 3))
    last = np.ones(video.shape[1:3], bool)
    for t, frame in enumerate(video):
        m = skin_mask_estimate(frame)
        if m.sum() >= min_pixels:
            last = m
        out[t] = frame[last].mean(0)
    return out


def realized_hr(wave: np.ndarray, fs: float) -> float:
    """The mean heart rate (bpm) of a clean pulse wave: beats = peaks at least 0.3 s apart (the
    simulator's heart-rate variability makes it differ slightly from the requested rate)."""
    with requires("methods"):
        from scipy.signal import find_peaks

    peaks, _ = find_peaks(wave, distance=max(1, int(0.3 * fs)), prominence=0.5)
    if peaks.size < 2:
        raise ValueError("the pulse wave has fewer than 2 beats")
    return 60.0 * fs / float(np.mean(np.diff(peaks)))


def skin_signal(video: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean colour of the skin pixels per frame, (T, 3)."""
    return video[:, mask].mean(1)


def pos(rgb: np.ndarray, fs: float, window_s: float = 1.6) -> np.ndarray:
    """The POS pulse signal (Wang et al. 2017) from per-frame mean skin colour (T, 3)."""
    T = rgb.shape[0]
    w = int(round(window_s * fs))
    if T < w:
        raise ValueError(f"POS needs at least {w} frames, got {T}")
    P = np.array([[0.0, 1.0, -1.0], [-2.0, 1.0, 1.0]])
    h = np.zeros(T)
    for s in range(0, T - w + 1):
        c = rgb[s : s + w] / rgb[s : s + w].mean(0)
        x = c @ P.T
        sig = x[:, 0] + (x[:, 0].std() / (x[:, 1].std() + 1e-12)) * x[:, 1]
        h[s : s + w] += sig - sig.mean()
    return h


def chrom(rgb: np.ndarray, fs: float, window_s: float = 1.6, band=(0.7, 3.0)) -> np.ndarray:
    """The CHROM pulse signal (de Haan & Jeanne 2013) from per-frame mean skin colour (T, 3):
    per half-overlapping Hann window, X = 3R - 2G and Y = 1.5R + G - 1.5B of the normalised colour,
    band-passed, S = X - (sigma_X / sigma_Y) Y, overlap-added."""
    with requires("methods"):
        from scipy.signal import butter, filtfilt

    T = rgb.shape[0]
    w = int(round(window_s * fs))
    w += w % 2
    if T < w:
        raise ValueError(f"CHROM needs at least {w} frames, got {T}")
    b, a = butter(3, [band[0] / (fs / 2), band[1] / (fs / 2)], btype="bandpass")
    h = np.zeros(T)
    win = np.hanning(w)
    pad = min(3 * max(len(a), len(b)), w - 1)
    for s in range(0, T - w + 1, w // 2):
        c = rgb[s : s + w] / rgb[s : s + w].mean(0)
        x = 3 * c[:, 0] - 2 * c[:, 1]
        y = 1.5 * c[:, 0] + c[:, 1] - 1.5 * c[:, 2]
        xf, yf = filtfilt(b, a, x, padlen=pad), filtfilt(b, a, y, padlen=pad)
        sig = xf - (xf.std() / (yf.std() + 1e-12)) * yf
        h[s : s + w] += win * (sig - sig.mean())
    return h


__all__ = [
    "Domain",
    "DOMAINS",
    "synth_video",
    "skin_signal",
    "skin_signal_estimated",
    "skin_mask_estimate",
    "pos",
    "chrom",
    "skin_mask",
    "perfusion_map",
    "pulse_wave",
]
