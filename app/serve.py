"""An OpenAI-compatible HTTP server for a GGUF: llama-cpp-python's own server (FastAPI under uvicorn), with
the chat template stored in the GGUF and the run's name as the model id.

Endpoints are llama-cpp-python's: /v1/models, /v1/chat/completions (streaming too), /v1/completions,
/v1/embeddings, /docs. It holds one model; requests are answered one at a time, in order.

With an API key (llama-cpp-python's own `api_key` setting) every /v1 request must send it as a bearer
token, else 401. Listening beyond loopback without one is refused unless --insecure says so.
"""
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from pathlib import Path

from app import AppError
from app.chat import run_of
from app.generate import CONTEXT
from app.gguf import check_gguf_file, gguf_load_error, gpu_layers

logger = logging.getLogger(__name__)


def serve(gguf: Path, host: str = "127.0.0.1", port: int = 8000, n_ctx: int = CONTEXT, api_key: str | None = None,
          insecure: bool = False):
    """Serve until Ctrl-C (or SIGTERM): uvicorn finishes the requests under way, then returns."""
    exposure = exposure_verdict(host, api_key, insecure)
    if exposure == "refused":
        raise AppError(f"--host {host} is reachable from other machines and there is no API key, so anyone on the "
                       f"network could use the model; give --api-key KEY (or set PREFALIGN_API_KEY), serve on "
                       f"127.0.0.1, or pass --insecure to allow it anyway")
    if exposure == "open":
        logger.warning(f"--insecure: listening on {host} without an API key; anyone who can reach port {port} "
                       f"can use the model")
    check_gguf_file(gguf)
    try:
        import llama_cpp.server.app  # noqa: F401  (its dependencies are llama-cpp-python's [server] extra)
        import uvicorn
    except ImportError as e:
        raise AppError(f"the server needs the package {e.name}, which is not installed; run `make setup`") from None
    sock = listen(host, port)  # before the model loads, so a taken port is said at once
    try:
        app = server_app(gguf, host, port, n_ctx, api_key)
    except BaseException:
        sock.close()
        raise
    print(f"serving {gguf.name} as model '{model_name(gguf)}' at http://{host}:{port}/v1 (OpenAI API"
          + (", API key required" if api_key else "") + "; Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port))
    # on SIGTERM uvicorn finishes the requests under way, then raises the signal again under the handler it
    # found: this one, which lets serve() return, so a service manager's stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down cleanly, then re-raises the Ctrl-C it caught
        pass


def server_app(gguf: Path, host: str, port: int, n_ctx: int, api_key: str | None = None):
    """llama-cpp-python's FastAPI app for the GGUF, with the run's name as the model id."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    os.environ.pop("CONFIG_FILE", None)  # create_app would take every setting from that file instead of ours
    # interrupt_requests=False: by default a waiting request ends the stream under way early (its client
    # gets a reply cut short without an error); here they queue. chat_format=None: the GGUF's own template.
    # n_gpu_layers: what fits the GPU (app/gguf.py gpu_layers; 0 on a CPU build of llama.cpp).
    layers, why = gpu_layers(gguf)
    logger.info(f"{gguf.name}: {why}")
    try:
        return create_app(server_settings=from_args(ServerSettings, host=host, port=port, interrupt_requests=False,
                                                    api_key=api_key or None),
                          model_settings=[from_args(ModelSettings, model=str(gguf), model_alias=model_name(gguf),
                                                    chat_format=None, n_ctx=n_ctx, n_gpu_layers=layers, verbose=False)])
    except ValueError as e:  # a file cut short inside: llama.cpp reads it only now
        raise gguf_load_error(gguf, e, n_ctx) or e from None


@contextlib.contextmanager
def background_server(gguf: Path, n_ctx: int = CONTEXT):
    """The same server on a free loopback port, in a thread, while the block runs; yields its base URL
    (http://127.0.0.1:PORT/v1). For `eval`: lm-eval talks to the GGUF as to any OpenAI-compatible API."""
    import threading
    import time

    import uvicorn

    check_gguf_file(gguf)
    sock = listen("127.0.0.1", 0)  # port 0: the system picks a free one
    port = sock.getsockname()[1]
    try:
        server = uvicorn.Server(uvicorn.Config(server_app(gguf, "127.0.0.1", port, n_ctx), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"the llama.cpp server for {gguf.name} stopped before it started")
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.should_exit = True
            thread.join()
    finally:
        sock.close()


def exposure_verdict(host: str, api_key: str | None, insecure: bool) -> str:
    """Pure: "local" (loopback only), "keyed" (beyond loopback, with a key), "open" (beyond, no key, --insecure)
    or "refused". A host name other than localhost counts as beyond: it may resolve to any interface."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host.lower() in ("localhost", "localhost.")
    if loopback:
        return "local"
    if api_key:
        return "keyed"
    return "open" if insecure else "refused"


def model_name(gguf: Path) -> str:
    """The id clients see: the run's name, or the file's stem for a GGUF outside a run."""
    run = run_of(gguf)
    return run.name if run else gguf.stem


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)  # SO_REUSEADDR on POSIX, as uvicorn does
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise AppError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host") from None


def from_args(settings_class, **values):
    """settings_class(**values), from these values only: a pydantic-settings class would also read every
    environment variable named like one of its fields (PORT, CACHE, VERBOSE, API_KEY...), so a stray one
    would change the server or fail its validation."""
    class FromArgs(settings_class):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **other_sources):
            return (init_settings,)
    return FromArgs(**values)
