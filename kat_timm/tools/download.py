"""Fetch released weights into the Hugging Face cache, so that ``timm.create_model(name, pretrained=True)`` later
works offline (README, "Offline machines").

What is fetched is what timm looks for: ``config.json`` and the first weights file of :func:`weight_files` that the
repo has (timm falls back from safetensors to ``pytorch_model.bin``). Cached files are found with
``try_to_load_from_cache`` and never fetched again, so checking a complete cache makes no request at all.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import timm
from huggingface_hub import (_CACHED_NO_EXIST, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url,
                             try_to_load_from_cache)
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils.sha import git_hash, sha_fileobj

__all__ = ["CachedFile", "DownloadError", "DownloadResult", "cached_file_intact", "download_pretrained",
           "format_size", "pretrained_names", "released_models", "resolve_hub_repo", "weight_files"]

HF_HUB_PREFIX = "hf-hub:"

PathLike = Union[str, Path]


class DownloadError(RuntimeError):
    """A model's files could not be fetched or found in the cache; the message names the model and the reason."""

    def __init__(self, model: str, reason: str):
        super().__init__(f"{model}: {reason}")
        self.model, self.reason = model, reason


@dataclasses.dataclass(frozen=True)
class CachedFile:
    """One file of a model in the cache: its name in the repo, its path in the snapshot folder, its size in bytes,
    and whether this call downloaded it (False: it was already cached)."""

    filename: str
    path: Path
    size: int
    fetched: bool


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """The cached files of one model: ``model`` (the name asked for), its Hub ``repo_id``, and ``files``."""

    model: str
    repo_id: str
    files: Tuple[CachedFile, ...]

    @property
    def folder(self) -> Path:
        """The snapshot folder holding the files."""
        return self.files[0].path.parent

    @property
    def fetched_bytes(self) -> int:
        return sum(f.size for f in self.files if f.fetched)

    @property
    def cached_bytes(self) -> int:
        return sum(f.size for f in self.files if not f.fetched)


def format_size(num_bytes: int) -> str:
    """Human-readable size in decimal units, as the Hugging Face tools print them: ``"22.9 MB"``."""
    size = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def released_models(pattern: str = "kat*") -> Dict[str, str]:
    """{model name: Hub repo id} of every released checkpoint, from timm's registered pretrained configs; a repo that
    several names load is listed once, under the name that equals the repo's own name when there is one."""
    by_repo: Dict[str, str] = {}
    for name in timm.list_pretrained(pattern):
        repo_id = (timm.models.get_pretrained_cfg(name).hf_hub_id or "").split("@", 1)[0]
        if not repo_id:
            continue
        if repo_id not in by_repo or name == repo_id.rsplit("/", 1)[-1]:
            by_repo[repo_id] = name
    return {name: repo_id for repo_id, name in sorted(by_repo.items())}


def pretrained_names(architecture: str) -> List[str]:
    """The pretrained names timm registers for ``architecture`` (``kat_tiny``, ``kat_tiny.vitft``), in its order."""
    # The "*" pattern also matches longer names (kat_tiny_patch16_224); keep those of this architecture only.
    return [name for name in timm.list_pretrained(f"{architecture}*")
            if timm.models.split_model_name_tag(name)[0] == architecture]


def weight_files(filename: str = constants.PYTORCH_WEIGHTS_NAME) -> List[str]:
    """The files timm's ``load_state_dict_from_hf`` tries, in its order: a safetensors alternative, then ``filename``."""
    if filename == constants.PYTORCH_WEIGHTS_NAME:
        return [constants.SAFETENSORS_SINGLE_FILE, filename]
    if filename.endswith(".bin"):
        return [filename[: -len(".bin")] + ".safetensors", filename]
    return [filename]


def _known_names() -> str:
    return ", ".join(released_models())


def resolve_hub_repo(name: str) -> Tuple[str, Optional[str], str]:
    """Where timm fetches ``name``'s pretrained weights from: (repo id, revision or None, weights filename).

    Args:
        name: a timm model name with an optional ``.tag`` (``kat_tiny``, ``kat_base.vitft``), or
            ``hf-hub:owner/repo[@revision]``.

    Raises:
        ValueError: an unknown model, an unknown tag, or a model without weights on the Hub; the message lists the
            released KAT checkpoints (or the model's own tags).
    """
    if name.startswith(HF_HUB_PREFIX):
        repo_id, _, revision = name[len(HF_HUB_PREFIX):].partition("@")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"{name!r} is not of the form hf-hub:owner/repo")
        return repo_id, revision or None, constants.PYTORCH_WEIGHTS_NAME
    architecture, tag = timm.models.split_model_name_tag(name)
    if not timm.models.is_model(architecture):
        raise ValueError(f"unknown model {name!r}; released KAT checkpoints: {_known_names()}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm: the architecture exists but not this tag
        tags = ", ".join(pretrained_names(architecture))
        raise ValueError(f"{architecture} has no pretrained tag {tag!r}; its pretrained names: {tags}") from None
    if cfg is None or not cfg.hf_hub_id:
        where = f" (timm fetches it from {cfg.url})" if cfg is not None and cfg.url else ""
        raise ValueError(f"{name} has no weights on the Hugging Face Hub{where}; "
                         f"released KAT checkpoints: {_known_names()}")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    return repo_id, revision or None, cfg.hf_hub_filename or constants.PYTORCH_WEIGHTS_NAME


def _cached_file(filename: str, path: str, fetched: bool) -> CachedFile:
    return CachedFile(filename=filename, path=Path(path), size=Path(path).stat().st_size, fetched=fetched)


def cached_file_intact(path: PathLike) -> bool:
    """Whether a file of the Hugging Face cache still holds what was downloaded: its ``blobs/<id>`` name is the
    SHA-256 (LFS files) or git blob hash (others) of the content. A file outside that layout counts as intact."""
    blob = Path(path).resolve()
    name = blob.name
    if blob.parent.name != "blobs" or len(name) not in (40, 64) or any(c not in "0123456789abcdef" for c in name):
        return True
    if len(name) == 64:
        with open(blob, "rb") as file:
            return sha_fileobj(file).hex() == name
    return git_hash(blob.read_bytes()) == name


def _hub_answers(repo_id: str, filename: str, revision: Optional[str]) -> None:
    """One HEAD request for the file, without retries, within huggingface_hub's ``HF_HUB_ETAG_TIMEOUT``: an
    unreachable Hub (or a missing repo or file) fails here at once, where ``hf_hub_download`` would first retry a
    connection error with growing waits for about 20 s."""
    get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision),
                         timeout=constants.HF_HUB_ETAG_TIMEOUT)


def _fetch(repo_id: str, filename: str, revision: Optional[str], cache_dir: Optional[PathLike],
           force: bool = False) -> CachedFile:
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    damaged = isinstance(cached, str) and not cached_file_intact(cached)
    if isinstance(cached, str) and not (force or damaged):
        return _cached_file(filename, cached, fetched=False)
    if damaged and constants.is_offline_mode():
        raise LocalEntryNotFoundError(f"the cached {filename} ({cached}) is damaged: its content does not match its "
                                      "checksum (a download or a copy was cut short)")
    if not constants.is_offline_mode():
        _hub_answers(repo_id, filename, revision)
    path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                           force_download=force or damaged)
    return _cached_file(filename, path, fetched=True)


def _fetch_weights(repo_id: str, filename: str, revision: Optional[str], cache_dir: Optional[PathLike],
                   force: bool = False) -> CachedFile:
    candidates = weight_files(filename)
    # Any one cached candidate is enough: offline, timm skips the candidates that are not cached.
    for candidate in candidates:
        cached = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return _fetch(repo_id, candidate, revision, cache_dir, force)  # again if damaged or forced
    for candidate in candidates:
        if try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir, revision=revision) is _CACHED_NO_EXIST:
            continue
        try:
            return _fetch(repo_id, candidate, revision, cache_dir, force)
        except LocalEntryNotFoundError:
            raise  # offline or unreachable: not a missing file
        except EntryNotFoundError:
            continue  # the repo has no such file: try the next candidate, as timm does
    raise EntryNotFoundError(f"the repo holds none of {', '.join(candidates)}")


def _cache_root(cache_dir: Optional[PathLike]) -> str:
    return str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE


def _is_network_error(error: Exception) -> bool:
    """A connection or transfer failure (the HTTP client's own exception types, or the builtin ones)."""
    module = type(error).__module__.split(".", 1)[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or module.startswith(("httpx", "httpcore", "urllib3"))


def _reason(error: Exception, repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike], wanted: str) -> str:
    """One line saying why fetching ``wanted`` from ``repo_id`` failed and what to do."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, LocalEntryNotFoundError):
        if detail.startswith("the cached "):
            return (f"{detail}; it can't be fetched again without the Hub (offline): run 'kat-timm download --force' "
                    "where the Hub is reachable")
        if constants.is_offline_mode():
            return (f"{wanted} is not in the cache ({_cache_root(cache_dir)}) and HF_HUB_OFFLINE=1 is set, so it "
                    "cannot be fetched; run the download on a machine with network access (without HF_HUB_OFFLINE)")
        return f"could not reach the Hugging Face Hub to fetch {wanted} (no network?): {detail}"
    if _is_network_error(error):
        return (f"network error while fetching {wanted}: {type(error).__name__}: {detail} (Hub: {constants.ENDPOINT}); "
                "run the download on a machine that reaches the Hub")
    if isinstance(error, GatedRepoError):
        return f"{repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login)"
    if isinstance(error, RepositoryNotFoundError):
        return f"no repository {repo_id} on the Hugging Face Hub (or it is private and you are not logged in)"
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r}"
    if isinstance(error, EntryNotFoundError):
        return f"{repo_id}: {detail}"
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub answered with an error for {repo_id}: {detail}"
    return f"could not write to the cache {_cache_root(cache_dir)}: {detail}"


def download_pretrained(name: str, cache_dir: Optional[PathLike] = None, force: bool = False) -> DownloadResult:
    """Make sure the cache holds what ``timm.create_model(name, pretrained=True)`` needs: ``config.json`` and the
    weights file timm will pick. Cached files are not fetched again (no request at all) unless damaged
    (:func:`cached_file_intact`) or ``force`` is set.

    Args:
        name: a model name with an optional tag (``kat_tiny``, ``kat_base_patch16_224.vitft``) or
            ``hf-hub:owner/repo``.
        cache_dir: the Hugging Face cache folder (default: huggingface_hub's, ``HF_HUB_CACHE``). timm reads this
            folder only when ``HF_HUB_CACHE`` points to it.
        force: fetch every file again, cached or not.

    Returns:
        What is in the cache now, with what this call fetched.

    Raises:
        DownloadError: unknown model or tag, no network, offline mode with the file missing from the cache, no such
            repo or file, or an unwritable cache; the message names the model and the reason.
    """
    try:
        repo_id, revision, weights = resolve_hub_repo(name)
    except ValueError as error:
        raise DownloadError(name, str(error)) from None
    files = []
    wanted = constants.CONFIG_NAME
    try:
        files.append(_fetch(repo_id, wanted, revision, cache_dir, force))
        wanted = " or ".join(weight_files(weights))
        files.append(_fetch_weights(repo_id, weights, revision, cache_dir, force))
    except Exception as error:
        if not isinstance(error, (EntryNotFoundError, HfHubHTTPError, OSError)) and not _is_network_error(error):
            raise
        raise DownloadError(f"{name} ({repo_id})", _reason(error, repo_id, revision, cache_dir, wanted)) from error
    return DownloadResult(model=name, repo_id=repo_id, files=tuple(files))
