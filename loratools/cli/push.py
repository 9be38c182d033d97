"""`loratools push ADAPTER REPO_ID`"""
from __future__ import annotations

import click

from .. import refs, share
from .common import emit_json, format_option, quiet_option, table


@click.command("push")
@click.argument("adapter", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (if it does not exist yet).")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--commit-message", default=None, help="Commit message (default: 'Upload adapter with loratools').")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--base-model", default=None, help="Hub id of the base model for the model card "
                                                  "(default: the adapter's own base_model_name_or_path).")
@click.option("--card", type=click.Choice(["merge", "replace"]), default="merge", show_default=True,
              help="merge: keep the folder's own README.md and add the generated metadata to it; replace: "
                   "upload the generated card instead.")
@click.option("--dry-run", is_flag=True, help="List the files and print the model card; upload nothing.")
@format_option
@quiet_option
def command(adapter, repo_id, private, revision, commit_message, create_pr, base_model, card, dry_run, fmt, quiet):
    """Validate ADAPTER (a path or a Hub reference) and upload it with a model card to REPO_ID, in one commit.

    Creates the repository if needed. Uses HF_TOKEN (or the token saved by `hf auth login`) and HF_ENDPOINT.

    \b
    Examples:
      loratools push ./my-adapter me/my-adapter --private
      loratools push ./my-adapter me/my-adapter --revision v2 --commit-message "rank 16"
      loratools push ./my-adapter me/my-adapter --dry-run
    """
    repo_id = refs.check_repo_id(repo_id)
    plan = share.plan_adapter_push(adapter, repo_id, revision=revision, base_model=base_model, card=card)
    info = None if dry_run else share.execute(plan, private=private, commit_message=commit_message,
                                                 create_pr=create_pr)
    if fmt == "json":
        emit_json({"repo_id": repo_id, "revision": revision or "main", "dry_run": dry_run, **plan.summary,
                   "files": [{"path": p, "size": s, "source": src} for p, s, src in plan.rows()],
                   "model_card": plan.card if dry_run else None,
                   "commit_url": getattr(info, "commit_url", None), "pr_url": getattr(info, "pr_url", None)})
        return
    if not quiet:
        click.echo(table(plan.rows(), ["file", "bytes", "from"]), err=True)
    if dry_run:
        if not quiet:
            click.echo(f"\n--- README.md ---\n{plan.card}", err=True)
        click.echo(f"would push {len(plan.rows())} file(s) to {repo_id} ({revision or 'main'}"
                   f"{', as a pull request' if create_pr else ''}); nothing uploaded (dry run)", err=True)
        return
    where = f"pull request {info.pr_url}" if info.pr_url else info.commit_url
    click.echo(f"pushed {len(plan.rows())} file(s) to {repo_id}: {where}", err=True)
