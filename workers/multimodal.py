"""The model runner's side of images: decode the frontend's pixel values, run the vision encoder when a step first
reaches an image's placeholder tokens, and merge the embeddings into the step's input embeddings.

    request tokens:  [ text ... | <image> x length | text ... ]        chunk of this step: [start, end)
                                 ^ item.offset
    rows of the chunk that fall inside the placeholder take embeddings[row - offset] of the item; the others keep
    their token embeddings. An item's embeddings stay until a chunk has passed its last placeholder (chunked
    prefill may split an image over several steps), then are dropped. A request whose image cannot be encoded
    fails alone (`request_errors`, at every step it appears in) and the others in the batch go on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from engine_core.protocol import MultiModalItem
    from workers.attention import AttentionMetadata

_DTYPES = {"float32": np.float32, "float16": np.float16}


class MultiModalModel(Protocol):
    """A `workers.models.CausalLM` that also takes images: its forward accepts merged `inputs_embeds`."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 attn_metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor: ...

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden]"""
        ...

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, *item shape] -> [n, tokens per image, hidden]"""
        ...


def is_multimodal(model: object) -> bool:
    return callable(getattr(model, "embed_images", None))


class MultiModalRequests:
    """Images of the running requests (every rank keeps the same and encodes the same)."""

    def __init__(self, model: MultiModalModel, device: torch.device) -> None:
        self.model, self.device = model, device
        self.items: dict[str, list[MultiModalItem]] = {}
        self.embeddings: dict[tuple[str, int], torch.Tensor] = {}  # (request id, item index) -> [length, hidden]
        self.failed: dict[str, str] = {}

    def start(self, request_id: str, items: list[MultiModalItem]) -> None:
        if items:
            self.items[request_id] = items

    def finish(self, request_id: str) -> None:
        for index in range(len(self.items.pop(request_id, []))):
            self.embeddings.pop((request_id, index), None)
        self.failed.pop(request_id, None)

    def inputs_embeds(self, input_ids: torch.Tensor, chunks: list[tuple[str, int, int, int]],
                      request_errors: dict[str, str]) -> torch.Tensor | None:
        """The step's input embeddings [T, hidden] with images merged in, or None when no chunk touches an image.
        `chunks`: (request id, first token, end token, first row in the flattened batch) per scheduled request."""
        needed = [(request_id, index, start, end, row)
                  for request_id, start, end, row in chunks
                  for index, item in enumerate(self.items.get(request_id, ()))
                  if item.offset < end and item.offset + item.length > start]
        if not needed and not any(request_id in self.failed for request_id, *_ in chunks):
            return None
        self._encode([(request_id, index) for request_id, index, *_ in needed
                      if (request_id, index) not in self.embeddings and request_id not in self.failed])
        embeds = self.model.embed_input_ids(input_ids)  # [T, hidden]
        for request_id, index, start, end, row in needed:
            if request_id in self.failed:
                continue
            item, embedding = self.items[request_id][index], self.embeddings[(request_id, index)]
            first, last = max(start, item.offset), min(end, item.offset + item.length)
            embeds[row + first - start: row + last - start] = embedding[first - item.offset: last - item.offset]
            if end >= item.offset + item.length:
                del self.embeddings[(request_id, index)]
        for request_id, *_ in chunks:
            if request_id in self.failed:
                request_errors[request_id] = self.failed[request_id]
        return embeds

    def _encode(self, keys: list[tuple[str, int]]) -> None:
        """Runs the vision encoder on the listed items, one batch per pixel shape."""
        by_shape: dict[tuple[int, ...], list[tuple[tuple[str, int], torch.Tensor]]] = {}
        for key in keys:
            try:
                pixels = _pixel_values(self.items[key[0]][key[1]])
            except ValueError as exc:
                self.failed[key[0]] = str(exc)
                continue
            by_shape.setdefault(tuple(pixels.shape), []).append((key, pixels))
        for group in by_shape.values():
            batch = torch.stack([pixels for _, pixels in group]).to(self.device)  # [n, *shape]
            embedded = self.model.embed_images(batch)  # [n, tokens, hidden]
            for (key, _), embedding in zip(group, embedded, strict=True):
                expected = self.items[key[0]][key[1]].length
                if embedding.shape[0] != expected:
                    self.failed[key[0]] = (f"image {key[1]} has {expected} placeholder tokens but the vision "
                                           f"encoder gives {embedding.shape[0]} embeddings")
                    continue
                self.embeddings[key] = embedding


def _pixel_values(item: MultiModalItem) -> torch.Tensor:
    dtype = _DTYPES.get(item.dtype)
    if dtype is None or item.modality != "image":
        raise ValueError(f"unsupported {item.modality} item of dtype {item.dtype}")
    array = np.frombuffer(item.pixel_values, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != int(np.prod(item.shape)):
        raise ValueError(f"image of shape {item.shape} carries {array.size} values")
    return torch.from_numpy(array.astype(np.float32).reshape(item.shape))
