"""The model runner's side of images: decode the frontend's pixel values, run the vision encoder when a step first
reaches an image's placeholder tokens, and merge the embeddings into the step's input embeddings.

    request tokens:  [ text ... | <image> x length | text ... ]        chunk of this step: [start, end)
                                 ^ item.offset
    rows of the chunk that fall inside the placeholder take embeddings[row - offset] of the item; the others keep
    their token embeddings. Embeddings are kept by the item's content hash (the encoder cache) until the engine
    core frees them (`engine_core.encoder_cache` decides when items are encoded and dropped): chunked prefill may
    split an item over several steps, and requests sharing an item share one encoding. A request whose image
    cannot be encoded fails alone (`request_errors`, at every step it appears in) and the others go on.

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
    """Media of the running requests and the encoder cache: embeddings by content hash, kept until the engine
    core frees them (`SchedulerOutput.free_encoder_hashes`), so an item shared by requests is encoded once. Every
    rank keeps the same and encodes the same."""

    def __init__(self, model: MultiModalModel, device: torch.device) -> None:
        self.model, self.device = model, device
        self.grid_model = cast(GridModel, model) if callable(getattr(model, "embed_grids", None)) else None
        self.items: dict[str, list[MultiModalItem]] = {}
        self.embeddings: dict[str, torch.Tensor] = {}  # content hash -> [length, hidden]
        self.failed: dict[str, str] = {}
        self.rope: dict[str, tuple[torch.Tensor, int]] = {}  # M-RoPE: [3, end] prompt positions, later shift
        self.num_encoded_items = 0  # this step's encoder runs (items), reported by rank 0

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
        self.items.pop(request_id, None)
        self.failed.pop(request_id, None)
        self.rope.pop(request_id, None)

    def free(self, content_hashes: list[str]) -> None:
        for content_hash in content_hashes:
            self.embeddings.pop(content_hash, None)

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
        """The step's input embeddings [T, hidden] with media merged in, or None when no chunk touches an item.
        `chunks`: (request id, first token, end token, first row in the flattened batch) per scheduled request."""
        self.num_encoded_items = 0
        needed = [(request_id, item, start, end, row)
                  for request_id, start, end, row in chunks
                  for item in self.items.get(request_id, ())
                  if item.offset < end and item.offset + item.length > start]
        if not needed and not any(request_id in self.failed for request_id, *_ in chunks):
            return None
        missing = {item.content_hash: (request_id, item) for request_id, item, *_ in needed
                   if item.content_hash not in self.embeddings and request_id not in self.failed}
        self._encode(list(missing.values()))
        embeds = self.model.embed_input_ids(input_ids)  # [T, hidden]
        for request_id, item, start, end, row in needed:
            embedding = self.embeddings.get(item.content_hash)
            if embedding is None:  # its encoding failed (in this request or another with the same item)
                self.failed.setdefault(request_id, f"{item.modality} at token {item.offset} could not be encoded")
            if embedding is not None and embedding.shape[-1] != embeds.shape[-1]:
                self.failed.setdefault(request_id, f"{item.modality} at token {item.offset} has embeddings "
                                                   f"{embedding.shape[-1]} wide, the model {embeds.shape[-1]}")
            if request_id in self.failed or embedding is None:
                continue
            first, last = max(start, item.offset), min(end, item.offset + item.length)
            embeds[row + first - start: row + last - start] = embedding[first - item.offset: last - item.offset]
        for request_id, *_ in chunks:
            if request_id in self.failed:
                request_errors[request_id] = self.failed[request_id]
        return embeds

    def _encode(self, wanted: list[tuple[str, MultiModalItem]]) -> None:
        """Runs the vision encoder on the listed items, one batch per pixel shape (or one for all grids);
        precomputed embeddings (`image_embeds`, --enable-mm-embeds) skip it."""
        for request_id, item in [entry for entry in wanted if entry[1].modality == "image_embeds"]:
            try:
                embedding = _pixel_values(item)
            except ValueError as exc:
                self.failed[request_id] = str(exc)
                continue
            if embedding.dim() == 2 and embedding.shape[0] == item.length:
                self.embeddings[item.content_hash] = embedding.to(self.device)
        wanted = [entry for entry in wanted if entry[1].modality != "image_embeds"]
        if self.grid_model is not None:
            self._encode_grids(wanted)
            return
        by_shape: dict[tuple[int, ...], list[tuple[str, MultiModalItem, torch.Tensor]]] = {}
        for request_id, item in wanted:
            try:
                pixels = _pixel_values(item)
            except ValueError as exc:
                self.failed[request_id] = str(exc)
                continue
            by_shape.setdefault(tuple(pixels.shape), []).append((request_id, item, pixels))
        for group in by_shape.values():
            batch = torch.stack([pixels for *_, pixels in group]).to(self.device)  # [n, *shape]
            embedded = self.model.embed_images(batch)  # [n, tokens, hidden]
            self._keep([(request_id, item) for request_id, item, _ in group], list(embedded))

    def _encode_grids(self, wanted: list[tuple[str, MultiModalItem]]) -> None:
        encodable: list[tuple[str, MultiModalItem, torch.Tensor, tuple[int, int, int]]] = []
        for request_id, item in wanted:
            try:
                pixels = _pixel_values(item)
                grid = item.grid_thw
                if grid is None or len(grid) != 3 or pixels.dim() != 2 or pixels.shape[0] != grid[0] * grid[1] * grid[2]:
                    raise ValueError(f"{item.modality} at token {item.offset}: {item.shape} patches do not fit "
                                     f"grid {grid}")
            except ValueError as exc:
                self.failed[request_id] = str(exc)
                continue
            encodable.append((request_id, item, pixels.to(self.device), (grid[0], grid[1], grid[2])))
        if encodable:
            assert self.grid_model is not None
            embedded = self.grid_model.embed_grids([pixels for _, _, pixels, _ in encodable],
                                                   [grid for *_, grid in encodable])
            self._keep([(request_id, item) for request_id, item, _, _ in encodable], embedded)

    def _keep(self, encoded: list[tuple[str, MultiModalItem]], embedded: list[torch.Tensor]) -> None:
        for (request_id, item), embedding in zip(encoded, embedded, strict=True):
            self.num_encoded_items += 1
            if embedding.shape[0] != item.length:
                self.failed[request_id] = (f"{item.modality} at token {item.offset} has {item.length} placeholder "
                                           f"tokens but the vision encoder gives {embedding.shape[0]} embeddings")
                continue
            self.embeddings[item.content_hash] = embedding


def _pixel_values(item: MultiModalItem) -> torch.Tensor:
    dtype = _DTYPES.get(item.dtype)
    if dtype is None or item.modality not in ("image", "video", "image_embeds"):
        raise ValueError(f"unsupported {item.modality} item of dtype {item.dtype}")
    array = np.frombuffer(item.pixel_values, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != int(np.prod(item.shape)):
        raise ValueError(f"image of shape {item.shape} carries {array.size} values")
    return torch.from_numpy(array.astype(np.float32).reshape(item.shape))
