"""Face preparation: load a photo, find the face, align and crop it.

HyperDreamBooth personalises from a single face photo, and works best when that
photo is framed like the portraits it was trained on (FFHQ / CelebA-HQ style:
whole head, a little hair and neck, eyes a bit above the middle). This module:

1. `load_image` reads any common photo safely and returns 8-bit RGB.
2. `detect_faces` finds faces with dlib's HOG detector plus its 5-point landmarks.
3. `align_face` rotates, scales and crops the best face onto a fixed template.
4. `face_embedding` / `identity_distance` give dlib's 128-d identity descriptor,
   used in evaluation to check that generated images still look like the person.

All models are small CPU models (dlib, CC0 weights from face_recognition_models).
Every user-facing failure raises `HdbError` with a one-line message.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from hdb.errors import HdbError
from hdb.files import check_regular_file

ImageSource = str | Path | Image.Image | np.ndarray

MAX_PIXELS = 40_000_000  # refuse before decoding: a 40 MP RGB image is already ~120 MB
MIN_SIDE = 64  # below this there is no usable face detail
DETECT_SIDE = 1024  # detect on a copy at most this big: HOG cost grows with pixel count
# dlib is not thread-safe: two threads in its detector, landmark or descriptor code abort the process within seconds
# (a server runs its handlers in threads). Every call into dlib holds this lock, whoever makes it.
DLIB_LOCK = threading.Lock()

# Canonical positions of dlib's 5 landmarks, in units of the distance between the
# eye centres, origin at the midpoint between the eyes, y pointing down. dlib's order
# is: eye on the image's right (outer corner, inner corner), eye on the image's left
# (outer, inner), base of the nose. Values: rounded mean over the frontal portraits in assets/.
TEMPLATE = np.array([[0.70, 0.0], [0.30, 0.0], [-0.70, 0.0], [-0.30, 0.0], [0.0, 0.74]])
# Where that shape goes in the crop. FFHQ's recipe works out at about 0.24 and 0.47;
# we frame slightly looser and higher so the whole head and some neck stay in view.
EYE_DISTANCE = 0.22  # eye-centre distance as a fraction of the crop width
EYE_LINE = 0.43  # height of the eyes as a fraction of the crop, from the top


@dataclass
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom in image pixels
    score: float  # HOG detector confidence; > 0 means detected
    landmarks: np.ndarray  # [5, 2] (x, y) pixel positions, dlib order (see TEMPLATE)


@dataclass
class AlignedFace:
    image: Image.Image  # size x size RGB crop
    face: Face  # the detection used, in source coordinates
    num_faces: int  # how many faces the photo had
    note: str | None  # a remark for the user, e.g. when several faces were found
    aligned_landmarks: np.ndarray  # face.landmarks mapped into the crop
    source: Image.Image = field(repr=False)  # the loaded photo, kept for face_embedding

    @classmethod
    def from_crop(cls, image: Image.Image) -> AlignedFace:
        """A crop that is already aligned (synthetic data, benchmarks): used as is, no detection."""
        landmarks = (TEMPLATE * EYE_DISTANCE + [0.5, EYE_LINE]) * image.width  # where alignment puts them
        face = Face(box=(0, 0, image.width, image.height), score=1.0, landmarks=landmarks)
        return cls(image=image, face=face, num_faces=1, note=None, aligned_landmarks=landmarks, source=image)


def load_image(source: ImageSource) -> Image.Image:
    """Load a path, PIL image or array as upright 8-bit RGB, refusing unusable input."""
    if isinstance(source, np.ndarray):
        name, image = "the image array", _array_to_image(source)
    elif isinstance(source, Image.Image):
        name, image = "the image", source
    else:
        name, image = _open_file(Path(source))
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise HdbError(
            f"{name} is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels, please downscale it"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos are often stored sideways
    except (OSError, SyntaxError) as e:
        raise HdbError(f"{name} could not be decoded (damaged or truncated file?): {e}") from None
    if min(image.size) < MIN_SIDE:
        raise HdbError(
            f"{name} is only {image.width}x{image.height} pixels; the shorter side "
            f"must be at least {MIN_SIDE} (a face at least ~150 px wide works best)"
        )
    return _to_rgb(image, name)


def _open_file(path: Path) -> tuple[str, Image.Image]:
    check_regular_file(path)  # a FIFO or a device would block or fail later
    if not path.is_file():
        raise HdbError(f"{path} is a folder, not an image" if path.is_dir() else f"Image file not found: {path}")
    try:
        # Image.open only reads the header, so the size check in load_image happens
        # before any pixels are decoded. Pillow's own bomb guard is made an error too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return path.name, Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise HdbError(f"{path.name} is refused as a possible decompression bomb: {e}") from None
    except PermissionError:
        raise HdbError(f"{path} cannot be read: permission denied") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise HdbError(f"{path.name} is not an image (or not a format Pillow can read)") from None


def _array_to_image(array: np.ndarray) -> Image.Image:
    array = np.squeeze(array)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise HdbError(f"the image array has shape {array.shape}; expected HxW, HxWx3 or HxWx4")
    return Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale 16-bit / float pixel values into 0..255 (Pillow would clip them instead)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16 or array.max(initial=0) > 255:
        scale = 1 / 257  # 16-bit range 0..65535
    elif np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1:
        scale = 255  # float range 0..1
    else:
        scale = 1
    return np.clip(np.round(array * scale), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Composite on white: transparent pixels often hold black or junk colours.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        raise HdbError(f"{name} has colour mode {image.mode}, which cannot be converted to RGB") from None


@functools.cache
def _models() -> tuple:
    """Load the three dlib models once, on first use (they take ~0.5 s). Called with DLIB_LOCK held."""
    import dlib  # imported on first use: code that only handles aligned crops runs without dlib
    import face_recognition_models as frm  # it only serves file paths

    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
        dlib.face_recognition_model_v1(frm.face_recognition_model_location()),
    )


def detect_faces(source: ImageSource) -> list[Face]:
    """All faces in the photo, most confident first (ties: largest first)."""
    image = load_image(source)
    import dlib

    scale = min(1.0, DETECT_SIDE / max(image.size))
    small = (
        image
        if scale == 1
        else image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BOX)
    )
    small_array, full_array = np.asarray(small), np.asarray(image)
    faces = []
    with DLIB_LOCK:
        detector, predictor, _ = _models()
        # HOG only finds faces >= ~80 px; upsampling once finds faces down to ~40 px.
        for upsample in (0, 1):
            boxes, scores, _ = detector.run(small_array, upsample, 0.0)
            if boxes:
                break
        for box, score in zip(boxes, scores, strict=True):
            # Map the box back to full resolution, where landmarks are more precise.
            full_box = dlib.rectangle(*(round(v / scale) for v in (box.left(), box.top(), box.right(), box.bottom())))
            shape = predictor(full_array, full_box)
            landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append(
                Face((full_box.left(), full_box.top(), full_box.right(), full_box.bottom()), float(score), landmarks)
            )
    return sorted(faces, key=lambda f: (-f.score, -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))


def crop_size(resolution: int) -> int:
    """The side faces are aligned at for a model of `resolution` px: never under 256 (tiny test models are 64 px)."""
    return max(resolution, 256)


def align_face(source: ImageSource, size: int = 512) -> AlignedFace:
    """Crop the most confident face to a size x size portrait, eyes and nose on TEMPLATE."""
    if size < MIN_SIDE:
        raise HdbError(f"crop size {size} is too small; use at least {MIN_SIDE}")
    image = load_image(source)
    faces = detect_faces(image)
    name = Path(source).name if isinstance(source, (str, Path)) else "the image"
    if not faces:
        raise HdbError(
            f"No face found in {name}; use a clear, front-facing photo of one person "
            "with the face well lit and at least ~100 pixels wide"
        )
    face = faces[0]
    note = f"{len(faces)} faces found; using the most confident one" if len(faces) > 1 else None
    # Work in continuous coordinates (pixel i spans [i, i+1)), as PIL's transform does.
    target = (TEMPLATE * EYE_DISTANCE + [0.5, EYE_LINE]) * size
    matrix = _similarity(face.landmarks + 0.5, target)
    crop = _warp(image, matrix, size)
    aligned = (face.landmarks + 0.5) @ matrix[:, :2].T + matrix[:, 2] - 0.5
    return AlignedFace(crop, face, len(faces), note, aligned, image)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping src onto dst, as 2x3.

    Written with complex numbers: dst ~ a * src + b, where multiplying by the complex
    number a is exactly a rotation plus a uniform scale (so no shear, no mirroring).
    """
    s, d = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    s0, d0 = s - s.mean(), d - d.mean()
    a = np.vdot(s0, d0) / np.vdot(s0, s0)  # vdot conjugates its first argument
    b = d.mean() - a * s.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def _warp(image: Image.Image, matrix: np.ndarray, size: int) -> Image.Image:
    """Resample the crop that `matrix` (image -> crop coordinates) describes."""
    scale = float(np.hypot(*matrix[:, 0]))  # crop pixels per image pixel
    # Bicubic sampling aliases when shrinking a lot, so first box-reduce the photo until
    # at most a 2x shrink is left for the bicubic step (FFHQ's alignment does this too).
    shrink = int(1 / scale)
    if shrink > 1:
        image = image.reduce(shrink)
        matrix = matrix * [shrink, shrink, 1]
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]  # crop -> image
    # Cut out just the region needed (cheap even for huge photos), padded where it
    # lies outside the photo.
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]]) @ inverse.T
    x0, y0 = np.floor(corners.min(0)).astype(int) - 4
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 4
    region = np.asarray(image.crop((max(x0, 0), max(y0, 0), min(x1, image.width), min(y1, image.height))))
    pads = ((max(-y0, 0), max(y1 - image.height, 0)), (max(-x0, 0), max(x1 - image.width, 0)), (0, 0))
    region = Image.fromarray(_pad(region, pads))
    inverse[:, 2] -= [x0, y0]  # the region's origin is (x0, y0) in image coordinates
    return region.transform((size, size), Image.Transform.AFFINE, inverse.ravel(), resample=Image.Resampling.BICUBIC)


def _pad(region: np.ndarray, pads: tuple) -> np.ndarray:
    """Extend a photo past its border without a hard seam, streaks or mirrored faces:
    repeat the edge pixels, then blur them and fade to the mean colour with distance."""
    (top, bottom), (left, right), _ = pads
    if not any((top, bottom, left, right)):
        return region
    padded = np.pad(region, pads, mode="edge")
    h, w = padded.shape[:2]
    y, x = np.ogrid[:h, :w]
    outside = np.maximum(
        np.maximum(top - y, y - (h - 1 - bottom)),  # pixels beyond the border
        np.maximum(left - x, x - (w - 1 - right)),
    )
    ramp = 0.1 * max(h, w)
    weight = np.clip(outside / ramp, 0, 1)[..., None]
    blurred = np.asarray(Image.fromarray(padded).filter(ImageFilter.GaussianBlur(ramp / 2)), np.float32)
    out = padded + (blurred - padded) * np.clip(10 * weight, 0, 1)
    out += (region.reshape(-1, 3).mean(0) - out) * weight
    return out.round().astype(np.uint8)


def face_embedding(source: AlignedFace | ImageSource) -> np.ndarray:
    """dlib's 128-d identity descriptor of the (most confident) face."""
    if isinstance(source, AlignedFace):
        image, face = source.source, source.face
    else:
        image = load_image(source)
        faces = detect_faces(image)
        if not faces:
            raise HdbError("No face found in the image, so no identity embedding can be computed")
        face = faces[0]
    import dlib

    pixels = np.asarray(image)
    with DLIB_LOCK:
        _, _, encoder = _models()
        # Rebuild dlib's landmark object; dlib then makes its own 150 px chip from the photo.
        shape = dlib.full_object_detection(
            dlib.rectangle(*face.box), [dlib.point(int(x), int(y)) for x, y in face.landmarks]
        )
        return np.array(encoder.compute_face_descriptor(pixels, shape))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two descriptors or embeddings (arrays or CPU tensors). Faces (dlib): one person's
    shipped photos give 0.95-0.97, different people 0.80-0.88."""
    a, b = (np.asarray(x, dtype=np.float64).ravel() for x in (a, b))
    similarity = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)
    return float(np.clip(similarity, -1, 1))  # clip: rounding can pass 1


def identity_distance(a: AlignedFace | ImageSource, b: AlignedFace | ImageSource) -> float:
    """L2 distance between descriptors; dlib's rule of thumb: < 0.6 means same person."""
    return float(np.linalg.norm(face_embedding(a) - face_embedding(b)))
