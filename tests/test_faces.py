"""Face loading, detection, alignment and identity, on real public-domain photos (assets/)."""

import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS
from PIL import Image

from hdb.errors import HdbError
from hdb.faces import (
    EYE_DISTANCE,
    EYE_LINE,
    MAX_PIXELS,
    AlignedFace,
    Face,
    align_face,
    detect_faces,
    face_embedding,
    identity_distance,
    load_image,
)

OBAMAS = ["obama.jpg", "obama2.jpg", "obama3.jpg"]
OTHERS = ["biden.jpg", "astronaut.png", "grace_hopper.jpg"]
PORTRAITS = OBAMAS + OTHERS
SIZE = 512


@pytest.fixture(scope="module")
def aligned() -> dict[str, AlignedFace]:
    return {name: align_face(ASSETS / name, size=SIZE) for name in PORTRAITS}


@pytest.fixture(scope="module")
def embeddings(aligned) -> dict[str, np.ndarray]:
    return {name: face_embedding(face) for name, face in aligned.items()}


def eye_centres(points: np.ndarray) -> np.ndarray:
    """[2, 2]: centre of the eye on the image's right, then the one on its left."""
    return np.array([points[0:2].mean(0), points[2:4].mean(0)])


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims width x height (no big allocation anywhere)."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    # Bytes 8..33 are the IHDR chunk: length(4) "IHDR"(4) width(4) height(4) ... crc(4).
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# --- Alignment on real portraits ---------------------------------------------------------


@pytest.mark.parametrize("name", PORTRAITS)
def test_each_portrait_gives_one_crop_of_the_asked_size(aligned, name):
    result = aligned[name]
    assert result.image.size == (SIZE, SIZE) and result.image.mode == "RGB"
    assert result.num_faces == 1 and result.note is None
    assert isinstance(result.face, Face) and result.face.landmarks.shape == (5, 2)
    assert result.face.score > 0
    # Eyes land where the template puts them (within 3 % of the crop).
    expected = np.array([[0.5 + EYE_DISTANCE / 2, EYE_LINE], [0.5 - EYE_DISTANCE / 2, EYE_LINE]])
    np.testing.assert_allclose(eye_centres(result.aligned_landmarks) / SIZE, expected, atol=0.03)


def test_other_crop_size():
    result = align_face(ASSETS / "grace_hopper.jpg", size=300)
    assert result.image.size == (300, 300)
    np.testing.assert_allclose(eye_centres(result.aligned_landmarks)[:, 1] / 300, EYE_LINE, atol=0.03)


def test_three_obama_photos_get_the_same_framing(aligned):
    eyes = [aligned[name].aligned_landmarks[:4] / SIZE for name in OBAMAS]
    for a, b in itertools.combinations(eyes, 2):
        assert np.abs(a - b).max() < 0.03


def test_aligned_landmarks_match_the_crop(aligned):
    # Re-detecting on the crop itself finds the face where aligned_landmarks says it is.
    result = aligned["obama.jpg"]
    again = detect_faces(result.image)
    assert len(again) == 1
    assert np.abs(again[0].landmarks - result.aligned_landmarks).max() < 0.02 * SIZE


def test_small_face_is_found_by_upsampling():
    small = Image.open(ASSETS / "obama.jpg").reduce(6)  # face ~45 px: below HOG's 80 px window
    faces = detect_faces(small)
    assert len(faces) == 1 and 35 < faces[0].box[2] - faces[0].box[0] < 70


def test_no_face_in_landscape():
    with pytest.raises(HdbError, match="No face found in landscape.jpg"):
        align_face(ASSETS / "landscape.jpg")
    assert detect_faces(ASSETS / "landscape.jpg") == []


def test_two_people_gives_one_crop_and_a_note(embeddings):
    obama = Image.open(ASSETS / "obama.jpg").convert("RGB")
    biden = Image.open(ASSETS / "biden.jpg").convert("RGB").crop((0, 0, 970, obama.height))
    collage = Image.new("RGB", (obama.width + biden.width, obama.height))
    collage.paste(obama, (0, 0))
    collage.paste(biden, (obama.width, 0))
    faces = detect_faces(collage)
    assert len(faces) == 2 and faces[0].score >= faces[1].score
    result = align_face(collage, size=256)
    assert result.image.size == (256, 256)
    assert result.num_faces == 2 and "2 faces" in result.note
    # The chosen face is one of the two people (the more confident detection).
    distances = [np.linalg.norm(face_embedding(result) - embeddings[n]) for n in ("obama.jpg", "biden.jpg")]
    assert min(distances) < 0.3


# --- Loading: bad and unusual input ------------------------------------------------------


@pytest.mark.parametrize("content", [b"this is not an image\n", bytes(range(256)) * 40])
def test_non_image_file_is_refused(tmp_path, content):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(HdbError, match="photo.jpg is not an image"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(HdbError, match="not found"):
        align_face(tmp_path / "nope.jpg")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.jpg"
    data = (ASSETS / "obama.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])  # valid header, half the pixels missing
    with pytest.raises(HdbError, match="could not be decoded"):
        load_image(path)


def test_tiny_image_is_refused(tmp_path):
    Image.new("RGB", (32, 32), "grey").save(tmp_path / "tiny.png")
    with pytest.raises(HdbError, match="32x32"):
        load_image(tmp_path / "tiny.png")
    with pytest.raises(HdbError, match="32x32"):
        align_face(np.zeros((32, 32, 3), np.uint8))


def test_huge_image_refused_before_decoding(tmp_path):
    # 48 MP: over our limit but under Pillow's own bomb threshold (~89 MP).
    path = png_claiming(tmp_path / "big.png", 8000, 6000)
    assert Image.open(path).size == (8000, 6000)
    with pytest.raises(HdbError, match=f"8000x6000.*limit is {MAX_PIXELS // 1_000_000} megapixels"):
        load_image(path)


def test_decompression_bomb_refused(tmp_path):
    path = png_claiming(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(HdbError, match="bomb.png"):
        align_face(path)


def test_exif_orientation_is_honoured(tmp_path, aligned):
    upright = Image.open(ASSETS / "obama.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    loaded = load_image(tmp_path / "sideways.jpg")
    assert loaded.size == upright.size
    result = align_face(tmp_path / "sideways.jpg", size=SIZE)
    assert np.abs(result.aligned_landmarks - aligned["obama.jpg"].aligned_landmarks).max() < 0.01 * SIZE


@pytest.fixture(scope="module")
def obama_small() -> Image.Image:
    return Image.open(ASSETS / "obama.jpg").convert("RGB").reduce(2)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_colour_modes_convert_and_detect(tmp_path, obama_small, mode):
    if mode == "I;16":  # 16-bit greyscale, as from a scanner or raw converter
        image = Image.fromarray(np.asarray(obama_small.convert("L")).astype(np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = obama_small.convert(mode)
    path = tmp_path / ("photo.jpg" if mode == "CMYK" else "photo.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == obama_small.size
    # Same brightness as the original (16-bit is scaled, not clipped to white).
    assert abs(np.asarray(loaded, np.float32).mean() - np.asarray(obama_small, np.float32).mean()) < 8
    assert len(detect_faces(loaded)) == 1


def test_transparency_is_composited_on_white(obama_small):
    rgba = obama_small.convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[:, :40] = 0  # a fully transparent strip on the left
    rgba.putalpha(Image.fromarray(alpha))
    loaded = np.asarray(load_image(rgba))
    assert (loaded[:, :40] == 255).all()
    assert (loaded[:, 40:] == np.asarray(obama_small)[:, 40:]).all()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_numpy_arrays(obama_small, dtype):
    pixels = np.asarray(obama_small)
    array = {"uint8": pixels, "uint16": pixels.astype(np.uint16) * 257, "float32": pixels.astype(np.float32) / 255}[
        dtype
    ]
    loaded = np.asarray(load_image(array))
    assert np.abs(loaded.astype(int) - pixels).max() <= 1


def test_bad_array_shape():
    with pytest.raises(HdbError, match="shape"):
        load_image(np.zeros((100, 100, 2), np.uint8))


# --- Identity ----------------------------------------------------------------------------


def test_same_person_is_closer_than_different_people(embeddings):
    assert all(e.shape == (128,) for e in embeddings.values())
    same = [np.linalg.norm(embeddings[a] - embeddings[b]) for a, b in itertools.combinations(OBAMAS, 2)]
    different = [np.linalg.norm(embeddings[a] - embeddings[b]) for a in OBAMAS for b in OTHERS]
    assert max(same) < 0.6 <= min(different)
    assert max(same) < min(different)


def test_identity_distance_accepts_images_and_aligned_faces(aligned):
    # From the aligned crop's pixels, the descriptor barely changes.
    assert identity_distance(aligned["obama.jpg"], aligned["obama.jpg"].image) < 0.15
    assert identity_distance(ASSETS / "obama2.jpg", aligned["biden.jpg"]) > 0.6


def test_embedding_needs_a_face():
    with pytest.raises(HdbError, match="No face found"):
        face_embedding(ASSETS / "landscape.jpg")
