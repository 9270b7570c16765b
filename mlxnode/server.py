"""One rank of `mlxnode serve`: join the ranks, load once, then generate for HTTP clients.

Every rank joins the group and loads its shard exactly as `mlxnode run` does (same
strategies, splits and cache), then runs `scheduler.serve` until stopped. Rank 0 also binds
the HTTP port before loading (so a taken port fails at once, and `/health` answers while the
model loads) and runs the API (`mlxnode.api`) under uvicorn in a background thread; the main
thread keeps all MLX work, since MLX streams belong to the thread that made them.

Python API::

    from mlxnode.config import load_config
    from mlxnode.server import serve

    serve(load_config().config)  # blocks; SIGTERM ends it
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from typing import Any

from .api import ApiSettings, create_app
from .config import Config, ServeConfig
from .engine import DEFAULT_LOAD_TIMEOUT, join_guarded, phase_guards
from .errors import MlxnodeError, UsageError
from .generation import encode_text
from .loading import load_sharded
from .logs import env_rank
from .model_files import load_tokenizer, read_metadata
from .scheduler import Scheduler
from .scheduler import serve as serve_steps
from .serve_metrics import ServeMetrics
from .watchdog import Watchdog

logger = logging.getLogger(__name__)

# The readiness probe's prompt: a few tokens, so the probe costs one short step.
PROBE_TEXT = "Hi"
# Seconds to let the HTTP thread finish open answers when the server stops.
HTTP_STOP_SECONDS = 5.0


def serve(
    config: Config,
    *,
    load_timeout: float | None = DEFAULT_LOAD_TIMEOUT,
    run_id: str | None = None,
) -> None:
    """Serve the model of `config` over every rank `mlx.launch` started, until stopped.

    Args:
        config: The resolved configuration (model, generation, distributed, serve...).
        load_timeout: Seconds a rank waits for its peers to join and load; None: forever.
        run_id: Name of this server's run, logged.

    Raises:
        UsageError: rank 0 cannot bind `serve.host`:`serve.port`.
        MlxnodeError: as `engine.run` raises while joining and loading; a peer that goes
            silent for the step timeout ends the process (`watchdog.hard_exit`).
    """
    rank, _ = env_rank()
    with Watchdog(
        rank=rank, timeout=config.distributed.step_timeout, exit_on_signals=True
    ) as watchdog:
        try:
            _serve(config, watchdog, load_timeout, run_id)
        except MlxnodeError as e:
            logger.error("%s", e)
            raise
        except Exception as e:
            logger.error("internal error: %s: %s", type(e).__name__, e)
            raise


def _serve(
    config: Config, watchdog: Watchdog, load_timeout: float | None, run_id: str | None
) -> None:
    group = join_guarded(config.distributed.backend, watchdog, load_timeout, run_id=run_id)
    wait, guard = phase_guards(watchdog, group, load_timeout)
    metadata = read_metadata(config)
    scheduler: Scheduler | None = None
    http: HttpThread | None = None
    if group.rank() == 0:
        sock = bind(config.serve)
        metrics = ServeMetrics()
        scheduler = _scheduler(config.serve, metrics, metadata.tokenizer)
        settings = ApiSettings(
            model_id=metadata.name,
            context_length=metadata.context_length,
            max_tokens=config.generation.max_tokens,
            max_body_bytes=config.serve.max_body_bytes,
            api_key=config.serve.api_key,
            chat_template=config.generation.use_chat_template,
            temperature=config.generation.temperature,
            top_p=config.generation.top_p,
            strategy=config.distributed.strategy,
            world_size=group.size(),
        )
        # The HTTP thread gets a tokenizer of its own: the main thread decodes with the other.
        tokenizer = load_tokenizer(metadata.path, metadata.config, config.generation.chat_template)
        http = HttpThread(create_app(scheduler, tokenizer, settings, metrics), sock)
        http.start()
        host, port = sock.getsockname()[:2]
        logger.info(
            "serving %s on http://%s:%d over %d rank(s); /ready turns 200 once loaded",
            metadata.name,
            host,
            port,
            group.size(),
        )
    try:
        sharded = load_sharded(config, group, metadata, wait=wait, replicas=False)
        logger.info("loaded; waiting for requests")
        with guard("serving"):
            serve_steps(
                sharded,
                scheduler,
                max_tokens=config.generation.max_tokens,
                max_batch=config.serve.max_batch,
                beat=watchdog.beat,
            )
    except BaseException as e:
        if scheduler is not None:
            scheduler.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        if http is not None:
            http.stop()


def _scheduler(settings: ServeConfig, metrics: ServeMetrics, tokenizer: Any) -> Scheduler:
    return Scheduler(
        queue_size=settings.queue_size,
        max_batch=settings.max_batch,
        ready_window=settings.ready_window,
        ready_deadline=settings.ready_deadline,
        probe_ids=encode_text(tokenizer, PROBE_TEXT, chat_template=False),
        tokenizer=tokenizer,
        on_step=metrics.step,
        on_token=lambda _request, seconds, first: metrics.token(seconds, first),
        on_finish=lambda _request, done: metrics.finished(done.prompt_tokens),
        on_memory=metrics.memory,
    )


def bind(settings: ServeConfig) -> socket.socket:
    """A listening socket on `settings.host`:`settings.port`; warns when open without a key.

    Raises:
        UsageError: the address cannot be bound (taken, or not this machine's).
    """
    host, port = settings.host, settings.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(
            f"cannot serve on {host}:{port} ({reason}); pick another --port or --host "
            "(serve.port, serve.host)"
        ) from e
    if not _loopback(host) and not settings.api_key:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this port can use the "
            "model; set serve.api_key (MLXNODE_SERVE_API_KEY) or bind 127.0.0.1",
            host,
        )
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpThread:
    """uvicorn serving `app` on `sock` in a daemon thread (signals stay with the main one)."""

    def __init__(self, app: Any, sock: socket.socket):
        import uvicorn

        # log_config=None: keep mlxnode's logging (rank prefix, redaction) for uvicorn's lines.
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="mlxnode-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=HTTP_STOP_SECONDS)
        with contextlib.suppress(OSError):
            self._sock.close()
