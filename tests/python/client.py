"""A backend service's view of Switchyard: a grpcio client generated from the project's .proto
files at run time (grpc_tools.protoc), no Rust involved.

usage: client.py PROTO_DIR ENDPOINT GOLDEN_JSON
For each golden prompt: Tokenize its text, then stream a greedy Generate of its token ids with
token ids and top-5 logprobs on. Prints one JSON object per prompt on stdout.
"""
import importlib
import json
import sys
import tempfile

from grpc_tools import protoc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
import grpc


def load_stubs(proto_dir, out):
    rc = protoc.main([
        "protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
        "switchyard/v1/inference.proto",
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    return (importlib.import_module("switchyard.v1.inference_pb2"),
            importlib.import_module("switchyard.v1.inference_pb2_grpc"))


def main():
    proto_dir, endpoint, golden_path = sys.argv[1:4]
    golden = json.load(open(golden_path))
    with tempfile.TemporaryDirectory() as out:
        pb, rpc = load_stubs(proto_dir, out)
        with grpc.insecure_channel(endpoint) as ch:
            # Standard services first: health, and the service list by reflection.
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="switchyard.v1.Inference"))
            services = sorted(ProtoReflectionDescriptorDatabase(ch).get_services())
            print(json.dumps({
                "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
                "services": services,
            }), flush=True)
            stub = rpc.InferenceStub(ch)
            models = stub.ListModels(pb.ListModelsRequest()).models
            for p in golden["prompts"]:
                tok = stub.Tokenize(pb.TokenizeRequest(text=p["text"]))
                req = pb.GenerateRequest(
                    request_id="py-" + p["name"],
                    token_ids=pb.TokenIds(ids=p["input_ids"]),
                    max_tokens=len(p["greedy"]["new_ids"]),
                    ignore_eos=True,
                    stream_token_ids=True,
                    logprobs=True,
                    top_logprobs=5,
                )
                started, ids, logprobs, finished = None, [], [], None
                for m in stub.Generate(req, timeout=60):
                    kind = m.WhichOneof("event")
                    if kind == "started":
                        started = m.started
                    elif kind == "delta":
                        ids.extend(m.delta.token_ids)
                        logprobs.extend(
                            {"token_id": l.token_id, "logprob": l.logprob,
                             "top": [[t.token_id, t.logprob] for t in l.top]}
                            for l in m.delta.logprobs)
                    elif kind == "finished":
                        finished = m.finished
                print(json.dumps({
                    "name": p["name"],
                    "model": models[0].name,
                    "tokenized": list(tok.ids),
                    "request_id": started.request_id,
                    "prompt_tokens": started.prompt_tokens,
                    "ids": ids,
                    "logprobs": logprobs,
                    "finish": pb.FinishReason.Name(finished.reason),
                    "completion_tokens": finished.usage.completion_tokens,
                }), flush=True)


if __name__ == "__main__":
    main()
