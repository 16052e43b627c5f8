"""`autoft dashboard`: optuna-dashboard on the study's storage and artifact folder, on loopback by default."""

from __future__ import annotations

from pathlib import Path

from ._private.storage import make_storage, mask_url
from .exceptions import ConfigError


def serve(storage_url: str, study: str | None, host: str = "127.0.0.1", port: int = 8080,
          artifacts: str = "studies/artifacts") -> None:
    """Blocks until Ctrl-C. Prints the URL of the study's page when the study exists."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    storage = make_storage(storage_url)
    url = f"http://{host}:{port}/dashboard"
    if study:
        try:
            study_id = storage.get_study_id_from_name(study)
        except KeyError:
            raise ConfigError(f"no study named {study!r} in {mask_url(storage_url)}; run autoft search first") from None
        url += f"/studies/{study_id}"
    Path(artifacts).mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard for {mask_url(storage_url)}: {url}  (Ctrl-C to stop)", flush=True)
    try:
        run_server(storage, host=host, port=port, artifact_store=FileSystemArtifactStore(artifacts))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    except KeyboardInterrupt:
        pass
