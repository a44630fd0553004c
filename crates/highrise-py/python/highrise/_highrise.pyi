"""Type stubs for the extension module (crates/highrise-py/src/lib.rs). Use the `highrise`
package's `Model`; these are the calls it makes."""

from typing import Iterator, Optional, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

class HighriseError(RuntimeError):
    """A failure inside the engine or a backend (the process and the model carry on)."""

_SteerArg = tuple[int, npt.NDArray[np.float32], float, Optional[list[int]]]
_PatchArg = tuple[int, int, npt.NDArray[np.float32], str]

class Stream:
    """The events of one generation: (token or None, text, logprob or None, finish or None)."""

    def __iter__(self) -> Iterator[tuple[Optional[int], str, Optional[float], Optional[str]]]: ...
    def __next__(self) -> tuple[Optional[int], str, Optional[float], Optional[str]]: ...
    def cancel(self) -> None: ...

class Engine:
    @staticmethod
    def load(
        path: Optional[str],
        backend: str,
        dtype: str,
        weights: str,
        kv_dtype: Optional[str],
        q8_activations: bool,
        kv_cache_bytes: int,
        threads: Optional[int],
    ) -> Engine: ...
    def info(self) -> dict[str, object]: ...
    def weight(self, name: str) -> npt.NDArray[np.float32]: ...
    def weight_names(self) -> list[str]: ...
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def pieces(self, ids: Sequence[int]) -> list[str]: ...
    def apply_chat_template(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str: ...
    def submit(self, prompt: Sequence[int], sampling: object, steer: Sequence[_SteerArg]) -> Stream: ...
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        sites: Sequence[str],
        layers: Optional[Sequence[int]],
        steer: Sequence[Sequence[_SteerArg]],
        patch: Sequence[Sequence[_PatchArg]],
        logits: bool,
    ) -> tuple[Optional[npt.NDArray[np.float32]], dict[tuple[str, int], npt.NDArray[np.float32]]]: ...
    def attention(
        self, q: npt.NDArray[np.float32], k: npt.NDArray[np.float32], layer: int
    ) -> npt.NDArray[np.float32]: ...
    def logit_lens(
        self, stream: npt.NDArray[np.float32], top_k: int
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]: ...
    def close(self) -> None: ...
