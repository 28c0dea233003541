"""Runs the executor gRPC server: health first (NOT_SERVING), then weights, then SERVING."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from executor_service.executor_config import ExecutorConfig
from executor_service.executor_info import LoadedExecutor
from executor_service.servicer import ExecutorServicer
from shared.bearer_auth import EXECUTOR_TOKEN_HOW, BearerAuthInterceptor
from shared.pb.pagewire.v1 import executor_pb2, executor_pb2_grpc
from shared.tls import server_credentials

log = structlog.get_logger(__name__)

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
# Plans for hundreds of sequences with long prompts can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# HTTP/2 pings to the scheduler: one that stops answering (killed host, cut network) loses its Step stream,
# and its lease runs out --executor-lease-seconds later.
KEEPALIVE_SECONDS = 5.0


def executor_loader(config: ExecutorConfig) -> Callable[[ExecutorConfig], LoadedExecutor]:
    """How to load the executor `config` describes; a simulated one never imports torch."""
    if config.simulate is not None:
        from executor_service.simulation.simulated_executor import SimulatedExecutor

        return SimulatedExecutor.load
    from executor_service.executor import Executor

    return Executor.load


async def serve(config: ExecutorConfig, shutdown_grace_seconds: float = 1.0) -> None:
    """Serves until SIGTERM/SIGINT; the health service says SERVING only once the model is loaded.

    The first SIGTERM/SIGINT drains (`drain`); a second one, or the drain ending, stops the server with a
    short grace: the only long RPC is the scheduler's Step stream, which never ends by itself; one step
    finishes well within it, and the scheduler recomputes whatever it loses.
    """
    interceptors = (
        [BearerAuthInterceptor(config.executor_token, SERVICE_NAME, EXECUTOR_TOKEN_HOW, "executor token")]
        if config.executor_token else []
    )
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_SECONDS * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_SECONDS * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    )
    servicer = ExecutorServicer(config.executor_lease_seconds)
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None and config.tls_key is not None:
        bound = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("executor_listening", address=address, tls=config.tls_cert is not None,
             mutual_tls=config.tls_client_ca is not None)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    load_task = asyncio.ensure_future(asyncio.to_thread(executor_loader(config), config))
    stop_task = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    load_error = load_task.exception() if load_task.done() else None
    if load_error is not None:
        # Shut the server down before the loop closes (no "Event loop is closed" at exit), then say why.
        log.error("executor_load_failed", model=config.simulate or config.model_dir,
            error=f"{type(load_error).__name__}: {load_error}")
        stop_task.cancel()
        # A grace, not 0: RPCs already being handled (the scheduler's retried Describe and health checks)
        # finish with their UNAVAILABLE instead of being cancelled mid-call, which grpc logs as tracebacks.
        await health_servicer.enter_graceful_shutdown()
        await server.stop(shutdown_grace_seconds)
        servicer.close()
        raise ValueError(f"cannot load the model {config.model_dir}: {load_error}") from load_error
    if load_task.done():
        servicer.attach(load_task.result())
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("executor_serving", address=address)
        await stop.wait()
        stop.clear()
        await drain(servicer, health_servicer, config.drain_timeout_seconds, stop)
    log.info("executor_stopping")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(shutdown_grace_seconds)
    servicer.close()
    log.info("executor_stopped")


async def drain(servicer: ExecutorServicer, health_servicer: health.aio.HealthServicer, timeout_seconds: float,
                interrupt: asyncio.Event) -> None:
    """Health NOT_SERVING, so schedulers place nothing new here; the open Step streams are served until
    their schedulers close them (a scheduler closes a NOT_SERVING executor's stream once no sequence of
    it runs here), `timeout_seconds` pass or `interrupt` is set (a second signal). New Describes and Step
    streams get UNAVAILABLE meanwhile."""
    servicer.drain()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("executor_draining", num_streams=servicer.num_streams, timeout_seconds=timeout_seconds)
    closed = asyncio.ensure_future(servicer.wait_streams_closed())
    interrupted = asyncio.ensure_future(interrupt.wait())
    done, pending = await asyncio.wait({closed, interrupted}, timeout=timeout_seconds,
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if closed in done:
        log.info("executor_drained")
    else:
        log.warning("executor_drain_cut", num_streams=servicer.num_streams,
                    reason="second signal" if interrupted in done else f"--drain-timeout-seconds {timeout_seconds}")
