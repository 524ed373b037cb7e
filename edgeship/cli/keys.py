"""``edgeship keys``: create the ed25519 key pair that signs packages."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeship.errors import UsageError
from edgeship.runtime.package.signing import key_id, load_public_key, write_keypair

app = typer.Typer(no_args_is_help=True)


@app.command("generate")
def generate(
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Directory to write NAME.key (private, mode 0600) and NAME.pub into."
    ),
    name: str = typer.Option("edgeship", "--name", metavar="NAME", help="File name stem of the key pair."),
    encrypt: bool = typer.Option(False, "--encrypt", help="Protect the private key with a passphrase (asked for)."),
    passphrase_file: Path | None = typer.Option(
        None,
        "--passphrase-file",
        metavar="FILE",
        help="Read the passphrase from this file (first line) instead of asking.",
    ),
) -> None:
    """Generate an ed25519 signing key pair (PKCS#8 private key, SubjectPublicKeyInfo public key)."""
    passphrase: bytes | None = None
    if passphrase_file is not None:
        try:
            passphrase = passphrase_file.read_text("utf-8").splitlines()[0].encode("utf-8")
        except (OSError, IndexError):
            raise UsageError(f"cannot read a passphrase from {passphrase_file}") from None
    elif encrypt:
        passphrase = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=True).encode("utf-8")
    if passphrase is not None and not passphrase:
        raise UsageError("the passphrase is empty")
    private, public = write_keypair(out, name, passphrase)
    typer.echo(f"private key: {private}  (keep it secret; it signs packages)")
    typer.echo(f"public key:  {public}  (give it to devices and anyone who verifies)")
    typer.echo(f"key id:      {key_id(load_public_key(public))}")
