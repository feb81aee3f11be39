"""Which frames make a clip, and reading them from a video file with PyAV.

PyAV carries its own FFmpeg (torchvision 0.29 has no video reader). Sampling follows
mmaction2's ``SampleFrames`` (the code of the Video Swin and DNL papers' Kinetics results):
a clip is ``clip_len`` frames ``frame_interval`` apart; a training clip starts at a random
frame, test clips are spread evenly over the video; a video shorter than a clip loops its
frames (``out_of_bound_opt='loop'``). Something-Something v2 takes one frame from each of
``clip_len`` equal segments of the whole video instead (:func:`uniform_clip_indices`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter


class VideoDecodeError(RuntimeError):
    """A video file that cannot be opened or decoded (broken, truncated, not a video)."""


def train_clip_indices(num_frames: int, clip_len: int, frame_interval: int, rng: np.random.Generator) -> np.ndarray:
    """One clip at a random offset: (clip_len,) frame indices."""
    span = clip_len * frame_interval
    start = int(rng.integers(0, num_frames - span + 1)) if num_frames > span else 0
    return (start + np.arange(clip_len) * frame_interval) % num_frames


def test_clip_indices(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> np.ndarray:
    """``num_clips`` clips evenly spread, each centred in its share of the video: (num_clips, clip_len)."""
    span = clip_len * frame_interval
    share = (num_frames - span + 1) / num_clips
    if num_frames > span - 1:
        starts = (np.arange(num_clips) * share + share / 2).astype(np.int64)
    else:
        starts = np.zeros(num_clips, dtype=np.int64)
    return (starts[:, None] + np.arange(clip_len)[None] * frame_interval) % num_frames


def uniform_clip_indices(num_frames: int, clip_len: int, rng: np.random.Generator | None) -> np.ndarray:
    """One clip over the whole video, one frame from each of ``clip_len`` equal segments: (clip_len,) indices.

    Video Swin's Something-Something v2 sampling (``SampleFrames(frame_uniform=True)``, its ``get_seq_frames``,
    from SlowFast's ssv2.py): segment i spans frames ``round(s * i)`` .. ``round(s * (i + 1))`` with
    ``s = (num_frames - 1) / clip_len``; training draws a frame in it (both ends included), testing (``rng`` None)
    takes its middle, ``(start + end) // 2``. ``np.round`` rounds halves to even, as the official code's.
    """
    size = (num_frames - 1) / clip_len
    starts = np.round(size * np.arange(clip_len)).astype(np.int64)
    ends = np.round(size * np.arange(1, clip_len + 1)).astype(np.int64)
    if rng is None:
        return (starts + ends) // 2
    return rng.integers(starts, ends + 1)


def resized_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    if not short_side:
        return height, width
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


class VideoReader:
    """An open video: its frame count, and its frames at chosen indices, as RGB uint8 (T, H, W, 3).

    ``short_side`` resizes while converting (FFmpeg's swscale, bilinear): decoding Kinetics at
    its native size and resizing afterwards would cost more than the decoding itself.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self.container = av.open(self.path)
        except (av.FFmpegError, OSError) as e:
            raise VideoDecodeError(str(e)) from e
        if not self.container.streams.video:
            self.close()
            raise VideoDecodeError("no video stream")
        self.stream = self.container.streams.video[0]
        # one converter for all frames: it keeps its swscale context (a new one per frame costs more than decoding)
        self.reformatter = VideoReformatter()
        self.num_frames = self.stream.frames or self._count_frames()
        if self.num_frames <= 0:
            self.close()
            raise VideoDecodeError("no video frame")

    def _count_frames(self) -> int:
        """Containers that do not store the count (some webm/mkv): count the packets, without decoding."""
        try:
            count = sum(1 for packet in self.container.demux(self.stream) if packet.size)
            self.container.seek(0)
        except av.FFmpegError as e:
            raise VideoDecodeError(str(e)) from e
        return count

    def read(self, indices: Sequence[int] | np.ndarray, short_side: int | None = None) -> np.ndarray:
        """Frames at ``indices`` (any order, repeats allowed) in decoding order up to the last one needed.

        A file holding fewer decodable frames than its header says is read again with indices
        looped over the frames it really has (the header is what sampling used).
        """
        indices = np.asarray(indices, dtype=np.int64)
        wanted = set(indices.tolist())
        last = int(indices.max())
        frames: dict[int, np.ndarray] = {}
        decoded = 0
        try:
            self.container.seek(0)
            for index, frame in enumerate(self.container.decode(self.stream)):
                decoded = index + 1
                if index in wanted:
                    height, width = resized_size(frame.height, frame.width, short_side)
                    rgb = self.reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation="BILINEAR")
                    frames[index] = rgb.to_ndarray()
                if index >= last:
                    break
        except av.FFmpegError as e:
            raise VideoDecodeError(str(e)) from e
        if decoded == 0:
            raise VideoDecodeError("no frame could be decoded")
        if decoded <= last:  # fewer frames than the header said: loop over those that exist
            self.num_frames = decoded
            return self.read(indices % decoded, short_side)
        return np.stack([frames[i] for i in indices.tolist()])

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
