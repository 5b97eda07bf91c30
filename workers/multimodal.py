"""The model runner's side of images: decode the frontend's pixel values, run the vision encoder when a step first
reaches an image's placeholder tokens, and merge the embeddings into the step's input embeddings.

    request tokens:  [ text ... | <image> x length | text ... ]        chunk of this step: [start, end)
                                 ^ item.offset
    rows of the chunk that fall inside the placeholder take embeddings[row - offset] of the item; the others keep
    their token embeddings. An item's embeddings stay until a chunk has passed its last placeholder (chunked
    prefill may split an image over several steps), then are dropped. A request whose image cannot be encoded
    fails alone (`request_errors`, at every step it appears in) and the others in the batch go on.

Models with M-RoPE (Qwen2-VL, `rope_positions`) give each request's tokens up to its last item three-row positions,
and every later token its index plus a shift: `positions` rewrites the step's positions accordingly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

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
        """[n, *item shape] -> [n, tokens per image, hidden] (fixed-size images; a model with `embed_grids`
        takes variable-size items instead)"""
        ...


class GridModel(Protocol):
    """A multimodal model whose items are patch grids of any size, with M-RoPE positions (Qwen2-VL)."""

    def embed_grids(self, patches: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each item's patches [t*h*w, values] -> its embeddings [tokens, hidden]."""
        ...

    def rope_positions(self, items: Sequence[MultiModalItem]) -> tuple[torch.Tensor, int]:
        """([3, end] positions of the prompt up to its last item's end, shift of every later token)"""
        ...


def is_multimodal(model: object) -> bool:
    return callable(getattr(model, "embed_images", None)) or callable(getattr(model, "embed_grids", None))


class MultiModalRequests:
    """Images of the running requests (every rank keeps the same and encodes the same)."""

    def __init__(self, model: MultiModalModel, device: torch.device) -> None:
        self.model, self.device = model, device
        self.grid_model = cast(GridModel, model) if callable(getattr(model, "embed_grids", None)) else None
        self.items: dict[str, list[MultiModalItem]] = {}
        self.embeddings: dict[tuple[str, int], torch.Tensor] = {}  # (request id, item index) -> [length, hidden]
        self.failed: dict[str, str] = {}
        self.rope: dict[str, tuple[torch.Tensor, int]] = {}  # M-RoPE: [3, end] prompt positions, later shift

    def start(self, request_id: str, items: list[MultiModalItem]) -> None:
        if not items:
            return
        self.items[request_id] = items
        if self.grid_model is not None:
            try:
                prefix, shift = self.grid_model.rope_positions(items)
                self.rope[request_id] = (prefix.to(self.device), shift)
            except ValueError as exc:
                self.failed[request_id] = str(exc)

    def finish(self, request_id: str) -> None:
        for index in range(len(self.items.pop(request_id, []))):
            self.embeddings.pop((request_id, index), None)
        self.failed.pop(request_id, None)
        self.rope.pop(request_id, None)

    def positions(self, positions: torch.Tensor, chunks: list[tuple[str, int, int, int]]) -> torch.Tensor:
        """The step's rotary positions: `positions` [T] (token indices) shifted for M-RoPE requests, [3, T] when
        some chunk reaches into a request's three-row prefix. `chunks` as for `inputs_embeds`."""
        touched = [(self.rope[request_id], start, end, row) for request_id, start, end, row in chunks
                   if request_id in self.rope]
        if not touched:
            return positions
        if all(start >= prefix.shape[1] for (prefix, _), start, _, _ in touched):  # decode and text: stay 1-D
            shifted = positions.clone()
            for (_, shift), start, end, row in touched:
                shifted[row:row + end - start] += shift
            return shifted
        rows = positions.expand(3, -1).clone()  # [3, T]
        for (prefix, shift), start, end, row in touched:
            split = min(max(prefix.shape[1], start), end)  # tokens before `split` take the prefix's positions
            rows[:, row:row + split - start] = prefix[:, start:split]
            rows[:, row + split - start:row + end - start] += shift
        return rows

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
        """Runs the vision encoder on the listed items, one batch per pixel shape (or one for all grids)."""
        if self.grid_model is not None:
            self._encode_grids(keys)
            return
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
            self._keep([key for key, _ in group], list(embedded))

    def _encode_grids(self, keys: list[tuple[str, int]]) -> None:
        encodable: list[tuple[tuple[str, int], torch.Tensor, tuple[int, int, int]]] = []
        for key in keys:
            item = self.items[key[0]][key[1]]
            try:
                pixels = _pixel_values(item)
                if item.grid_thw is None or len(item.grid_thw) != 3 or pixels.dim() != 2 or \
                        pixels.shape[0] != item.grid_thw[0] * item.grid_thw[1] * item.grid_thw[2]:
                    raise ValueError(f"{item.modality} {key[1]}: {item.shape} patches do not fit grid {item.grid_thw}")
            except ValueError as exc:
                self.failed[key[0]] = str(exc)
                continue
            encodable.append((key, pixels.to(self.device), (item.grid_thw[0], item.grid_thw[1], item.grid_thw[2])))
        if encodable:
            assert self.grid_model is not None
            embedded = self.grid_model.embed_grids([pixels for _, pixels, _ in encodable],
                                                   [grid for _, _, grid in encodable])
            self._keep([key for key, _, _ in encodable], embedded)

    def _keep(self, keys: list[tuple[str, int]], embedded: list[torch.Tensor]) -> None:
        for key, embedding in zip(keys, embedded, strict=True):
            item = self.items[key[0]][key[1]]
            if embedding.shape[0] != item.length:
                self.failed[key[0]] = (f"{item.modality} {key[1]} has {item.length} placeholder tokens but the "
                                       f"vision encoder gives {embedding.shape[0]} embeddings")
                continue
            self.embeddings[key] = embedding


def _pixel_values(item: MultiModalItem) -> torch.Tensor:
    dtype = _DTYPES.get(item.dtype)
    if dtype is None or item.modality not in ("image", "video"):
        raise ValueError(f"unsupported {item.modality} item of dtype {item.dtype}")
    array = np.frombuffer(item.pixel_values, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != int(np.prod(item.shape)):
        raise ValueError(f"image of shape {item.shape} carries {array.size} values")
    return torch.from_numpy(array.astype(np.float32).reshape(item.shape))
