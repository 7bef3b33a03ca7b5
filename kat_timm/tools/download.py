"""Released weights from the Hugging Face Hub or its cache, failing fast when the Hub is unreachable (README,
"Offline machines")."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import timm
from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils.sha import git_hash, sha_fileobj

__all__ = ["CachedFile", "DownloadError", "DownloadResult", "cached_file_intact", "cached_weights",
           "download_pretrained", "format_size", "hub_unreachable", "pretrained_names", "released_models",
           "resolve_hub_repo", "weight_files", "weights_path"]

HF_HUB_PREFIX = "hf-hub:"

PathLike = Union[str, Path]


class DownloadError(RuntimeError):
    """A model's files could not be fetched or found in the cache; the message names the model and the reason."""

    def __init__(self, model: str, reason: str):
        super().__init__(f"{model}: {reason}")
        self.model, self.reason = model, reason


@dataclasses.dataclass(frozen=True)
class CachedFile:
    """One file of a model in the cache; ``fetched``: this call downloaded it (False: it was already cached)."""

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
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def released_models(pattern: str = "kat*") -> Dict[str, str]:
    """{model name: Hub repo id} of every released checkpoint, each repo once (under its own name when registered)."""
    by_repo: Dict[str, str] = {}
    for name in timm.list_pretrained(pattern):
        repo_id = (timm.models.get_pretrained_cfg(name).hf_hub_id or "").split("@", 1)[0]
        if repo_id and (repo_id not in by_repo or name == repo_id.rsplit("/", 1)[-1]):
            by_repo[repo_id] = name
    return {name: repo_id for repo_id, name in sorted(by_repo.items())}


def pretrained_names(architecture: str) -> List[str]:
    """The pretrained names timm registers for ``architecture`` (``kat_tiny``, ``kat_tiny.vitft``), in its order."""
    # The "*" pattern also matches longer names (kat_tiny_patch16_224); keep those of this architecture only.
    return [name for name in timm.list_pretrained(f"{architecture}*")
            if timm.models.split_model_name_tag(name)[0] == architecture]


def weight_files(filename: str = constants.PYTORCH_WEIGHTS_NAME) -> List[str]:
    """The files timm's ``load_state_dict_from_hf`` tries, in order: a safetensors alternative, then ``filename``."""
    if filename == constants.PYTORCH_WEIGHTS_NAME:
        return [constants.SAFETENSORS_SINGLE_FILE, filename]
    if filename.endswith(".bin"):
        return [filename[: -len(".bin")] + ".safetensors", filename]
    return [filename]


def resolve_hub_repo(name: str) -> Tuple[str, Optional[str], str]:
    """(repo id, revision or None, weights filename) that timm fetches ``name``'s (``model[.tag]`` or
    ``hf-hub:owner/repo[@revision]``) pretrained weights from; ``ValueError`` for a name without weights there."""
    if name.startswith(HF_HUB_PREFIX):
        repo_id, _, revision = name[len(HF_HUB_PREFIX):].partition("@")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"{name!r} is not of the form hf-hub:owner/repo")
        return repo_id, revision or None, constants.PYTORCH_WEIGHTS_NAME
    architecture, tag = timm.models.split_model_name_tag(name)
    if not timm.models.is_model(architecture):
        raise ValueError(f"unknown model {name!r}; released KAT checkpoints: {', '.join(released_models())}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm: the architecture exists but not this tag
        tags = ", ".join(pretrained_names(architecture))
        raise ValueError(f"{architecture} has no pretrained tag {tag!r}; its pretrained names: {tags}") from None
    if cfg is None or not cfg.hf_hub_id:
        where = f" (timm fetches it from {cfg.url})" if cfg is not None and cfg.url else ""
        raise ValueError(f"{name} has no weights on the Hugging Face Hub{where}; released KAT checkpoints: "
                         f"{', '.join(released_models())}")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    return repo_id, revision or None, cfg.hf_hub_filename or constants.PYTORCH_WEIGHTS_NAME


def cached_file_intact(path: PathLike) -> bool:
    """Whether a file of the Hugging Face cache still holds what was downloaded: its ``blobs/<id>`` name is the
    SHA-256 (LFS files) or git blob hash (others) of the content; a file outside that layout counts as intact."""
    blob = Path(path).resolve()
    name = blob.name
    if blob.parent.name != "blobs" or len(name) not in (40, 64) or any(c not in "0123456789abcdef" for c in name):
        return True
    if len(name) == 64:
        with open(blob, "rb") as file:
            return sha_fileobj(file).hex() == name
    return git_hash(blob.read_bytes()) == name


def hub_unreachable(url: Optional[str] = None) -> Optional[str]:
    """None when the Hub answers one HEAD request within ``HF_HUB_ETAG_TIMEOUT``, else why not (``hf_hub_download``
    alone retries for about 20 s)."""
    from huggingface_hub.utils import build_hf_headers, get_session  # at call time: tests replace the session

    if constants.is_offline_mode():
        return "offline mode (HF_HUB_OFFLINE=1)"
    host = constants.ENDPOINT.split("://", 1)[-1]
    try:
        get_session().head(url or constants.ENDPOINT, headers=build_hf_headers(), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # whatever the HTTP library raises, the Hub did not answer
        if "timeout" in type(error).__name__.lower() or "timed out" in str(error):
            return f"{host} did not answer within {constants.HF_HUB_ETAG_TIMEOUT:g} s (HF_HUB_ETAG_TIMEOUT)"
        detail = str(error).strip().splitlines()
        return f"{host} is unreachable: {detail[0] if detail else type(error).__name__}"
    return None


def _hub_answers(repo_id: str, filename: str, revision: Optional[str]) -> None:
    """Raise ``ConnectionError`` at once when the Hub does not answer (:func:`hub_unreachable`)."""
    reason = hub_unreachable(hf_hub_url(repo_id, filename, revision=revision))
    if reason is not None:
        raise ConnectionError(reason)


def _first_in_repo(candidates: List[str], fetch: Callable[[str], Any]) -> Any:
    """``fetch`` of the first candidate file the repo has, as timm picks its weights file; None when it has none."""
    for candidate in candidates:
        try:
            return fetch(candidate)
        except LocalEntryNotFoundError:
            raise  # offline or unreachable: not a missing file
        except EntryNotFoundError:
            continue
    return None


def cached_weights(repo_id: str, candidates: List[str], revision: Optional[str] = None,
                   cache_dir: Optional[PathLike] = None) -> Optional[Tuple[str, str]]:
    """(filename, path) of the first candidate in the cache, or None."""
    for candidate in candidates:
        path = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir, revision=revision)
        if isinstance(path, str):
            return candidate, path
    return None


def weights_path(repo_id: str, filename: str = constants.PYTORCH_WEIGHTS_NAME, revision: Optional[str] = None,
                 offline: bool = False) -> str:
    """The local path of the weights file timm loads from ``repo_id``: through ``hf_hub_download`` when the Hub
    answers, else from the cache; ``DownloadError`` says why neither has it (the Hub's own errors pass through)."""
    candidates = weight_files(filename)
    reason = "offline mode (--offline)" if offline else hub_unreachable(hf_hub_url(repo_id, candidates[0],
                                                                                   revision=revision))
    if reason is None:
        path = _first_in_repo(candidates, lambda name: hf_hub_download(repo_id, name, revision=revision))
        if path is not None:
            return path
        reason = f"{repo_id} has none of {', '.join(candidates)}"
    cached = cached_weights(repo_id, candidates, revision)
    if cached is None:
        raise DownloadError(repo_id, f"{reason}, and they are not in the local Hugging Face cache "
                                     f"({constants.HF_HUB_CACHE})")
    return cached[1]


def _fetch(repo_id: str, filename: str, revision: Optional[str], cache_dir: Optional[PathLike],
           force: bool = False) -> CachedFile:
    path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    damaged = isinstance(path, str) and not cached_file_intact(path)
    fetched = not isinstance(path, str) or force or damaged
    if damaged and constants.is_offline_mode():
        raise LocalEntryNotFoundError(f"the cached {filename} ({path}) is damaged: its content does not match its "
                                      "checksum (a download or a copy was cut short)")
    if fetched:
        if not constants.is_offline_mode():
            _hub_answers(repo_id, filename, revision)
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                               force_download=force or damaged)
    return CachedFile(filename=filename, path=Path(path), size=Path(path).stat().st_size, fetched=fetched)


def _fetch_weights(repo_id: str, filename: str, revision: Optional[str], cache_dir: Optional[PathLike],
                   force: bool = False) -> CachedFile:
    candidates = weight_files(filename)
    # Any one cached candidate is enough: offline, timm skips the candidates that are not cached. Those the cache
    # remembers the repo lacks are not asked for.
    cached = cached_weights(repo_id, candidates, revision, cache_dir)
    names = [cached[0]] if cached else [name for name in candidates if try_to_load_from_cache(
        repo_id, name, cache_dir=cache_dir, revision=revision) is not _CACHED_NO_EXIST]
    found = _first_in_repo(names, lambda name: _fetch(repo_id, name, revision, cache_dir, force))
    if found is None:
        raise EntryNotFoundError(f"the repo holds none of {', '.join(candidates)}")
    return found


def _is_network_error(error: Exception) -> bool:
    """A connection or transfer failure (the HTTP client's own exception types, or the builtin ones)."""
    module = type(error).__module__.split(".", 1)[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or module.startswith(("httpx", "httpcore", "urllib3"))


_HUB_ERRORS = (
    (GatedRepoError, "{repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login)"),
    (RepositoryNotFoundError, "no repository {repo_id} on the Hugging Face Hub (or it is private and you are not "
                              "logged in)"),
    (RevisionNotFoundError, "{repo_id} has no revision {revision!r}"),
    (EntryNotFoundError, "{repo_id}: {detail}"),
    (HfHubHTTPError, "the Hugging Face Hub answered with an error for {repo_id}: {detail}"),
)


def _reason(error: Exception, repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike], wanted: str) -> str:
    """One line saying why fetching ``wanted`` from ``repo_id`` failed and what to do."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    cache = cache_dir or constants.HF_HUB_CACHE
    if isinstance(error, LocalEntryNotFoundError):
        if detail.startswith("the cached "):
            return (f"{detail}; it can't be fetched again without the Hub (offline): run 'kat-timm download --force' "
                    "where the Hub is reachable")
        if constants.is_offline_mode():
            return (f"{wanted} is not in the cache ({cache}) and HF_HUB_OFFLINE=1 is set, so it "
                    "cannot be fetched; run the download on a machine with network access (without HF_HUB_OFFLINE)")
        return f"could not reach the Hugging Face Hub to fetch {wanted} (no network?): {detail}"
    if _is_network_error(error):
        return (f"network error while fetching {wanted}: {type(error).__name__}: {detail} (Hub: {constants.ENDPOINT}); "
                "run the download on a machine that reaches the Hub")
    for kind, text in _HUB_ERRORS:  # the first match: the subclasses come before HfHubHTTPError
        if isinstance(error, kind):
            return text.format(repo_id=repo_id, revision=revision, detail=detail)
    return f"could not write to the cache {cache}: {detail}"


def download_pretrained(name: str, cache_dir: Optional[PathLike] = None, force: bool = False) -> DownloadResult:
    """Make sure the cache (``cache_dir``, default ``HF_HUB_CACHE``) holds the ``config.json`` and weights file that
    ``timm.create_model(name, pretrained=True)`` loads; cached files are fetched again only if damaged or ``force``.
    ``DownloadError`` names the model and the reason."""
    try:
        repo_id, revision, weights = resolve_hub_repo(name)
    except ValueError as error:
        raise DownloadError(name, str(error)) from None
    if force and constants.is_offline_mode():  # huggingface_hub would raise a ValueError after the first lookup
        raise DownloadError(name, "force=True fetches the files again, which offline mode (HF_HUB_OFFLINE=1) forbids")
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
