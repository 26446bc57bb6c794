"""`push RUN --repo USER/NAME`: a run's model to the Hugging Face hub, in one commit, with the user's own token.

Layout: merged/ (16-bit safetensors, tokenizer, model card) at the repo's root and gguf/ (GGUF files,
Modelfile, card) in gguf/, where the Modelfile's `FROM ./file.gguf` still holds. With --gguf-only, gguf/
is the root, so its card is the repo's. Nothing else of the run goes: not adapter/, checkpoints/ (with
TRL's ref/), base-gguf/, the report or the logs.
"""
from pathlib import Path

from app import AppError


def upload_plan(run: Path, gguf_only: bool = False) -> list[tuple[Path, str]]:
    """[(local file, path in the repo)], in upload order. Hidden files (temporary names) stay behind."""
    folders = [("gguf", "")] if gguf_only else [("merged", ""), ("gguf", "gguf/")]
    missing = [name for name, _ in folders if not (run / name).is_dir()]
    if missing:
        raise AppError(f"{run.name} has no {' or '.join(f'{m}/' for m in missing)} to push (a reward run has none; "
                       f"an unfinished one: python -m app export {run.name})")
    return [(path, prefix + str(path.relative_to(run / name)))
            for name, prefix in folders for path in sorted((run / name).rglob("*"))
            if path.is_file() and not any(p.startswith(".") for p in path.relative_to(run / name).parts)]


def push_run(run: Path, repo: str, gguf_only: bool = False, private: bool = False, dry_run: bool = False,
             log=print) -> str | None:
    """Upload the plan to `repo` (created if needed); returns its URL. `dry_run`: list it, upload nothing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise AppError(f"--repo {repo!r} is not a hub repository id: give NAME or USER/NAME (letters, digits, "
                       f"'-', '_', '.'; no '--' or '..'; at most 96 characters)") from None
    plan = upload_plan(run, gguf_only)
    if not (run / "manifest.json").is_file():  # written last: without it the export never finished
        raise AppError(f"{run.name} has no manifest.json: its export did not finish (python -m app export {run.name})")
    for path, in_repo in plan:
        log(f"{size(path.stat().st_size):>10}  {in_repo}")
    total = sum(path.stat().st_size for path, _ in plan)
    if not any(in_repo.endswith("README.md") for _, in_repo in plan):
        log(f"note: no model card in the run yet; `python -m app report {run.name}` writes one")
    if dry_run:
        log(f"{size(total):>10}  in {len(plan)} files (dry run: nothing uploaded)")
        return None

    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from app.model import hub_reachable
    from app.runs import verify_run
    problems = verify_run(run)  # what goes up is what the export wrote and checked
    if problems:
        raise AppError(f"{run.name} no longer matches its manifest ({'; '.join(problems[:3])}); nothing was uploaded")
    token = get_token()  # HF_TOKEN, else the one `hf auth login` saved: the user's own
    if not token:
        raise AppError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a write token)")
    if not hub_reachable():
        raise AppError("the Hugging Face hub is not reachable (no network, or HF_HUB_OFFLINE is set); nothing "
                       "was uploaded")
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo, private=private, exist_ok=True).repo_id  # NAME -> USER/NAME
        log(f"uploading {size(total)} in {len(plan)} files to {repo_id} ...")
        # one commit: the repo never shows the weights without their card, or half of the GGUFs
        commit = api.create_commit(repo_id, operations=[CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path)
                                                        for path, in_repo in plan],
                                   commit_message=f"{run.name}: {'GGUF' if gguf_only else 'merged weights and GGUF'}")
    except HfHubHTTPError as e:  # a token without write access, someone else's repo, ...
        raise AppError(f"the hub refused the upload to {repo}: {str(e).splitlines()[0]}") from None
    log(f"pushed: {commit.repo_url}")
    return str(commit.repo_url)


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} B"
