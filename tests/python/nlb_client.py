"""A client written by someone else: Python grpcio stubs generated from proto/marchproxy/*.proto,
calling the NLB exactly as the README shows. Exits non-zero with a message on any mismatch.

Usage: nlb_client.py HOST:PORT API_KEY   (stubs importable from PYTHONPATH)
"""

import json
import sys

import grpc

from marchproxy import nlb_pb2, nlb_pb2_grpc, types_pb2


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    target, api_key = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target)
    stub = nlb_pb2_grpc.NLBServiceStub(channel)
    auth = [("authorization", f"Bearer {api_key}")]

    try:
        stub.GetNLBStatus(nlb_pb2.GetNLBStatusRequest())
        check(False, "a call without the key must be refused")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.UNAUTHENTICATED, f"expected UNAUTHENTICATED, got {error.code()}")

    registered = stub.RegisterModule(
        nlb_pb2.RegisterModuleRequest(
            instance=types_pb2.ModuleInstance(
                instance_id="py-alb-1",
                module_type=types_pb2.MODULE_TYPE_ALB,
                address="127.0.0.1:50051",
                version="v1",
                metadata={"data_address": "127.0.0.1:8080"},
            ),
            initial_routes=[
                types_pb2.Route(route_id="py-web", protocol=types_pb2.PROTOCOL_HTTP, source_pattern="*.py.example")
            ],
        ),
        metadata=auth,
    )
    check(registered.success and registered.registration_id, "registration")

    beat = stub.Heartbeat(
        nlb_pb2.HeartbeatRequest(
            instance_id="py-alb-1",
            registration_id=registered.registration_id,
            status=types_pb2.HEALTH_STATUS_HEALTHY,
            current_stats=types_pb2.ModuleStats(active_connections=2, total_requests=10),
        ),
        metadata=auth,
    )
    check(beat.acknowledged, "heartbeat acknowledged")

    listed = stub.ListModules(nlb_pb2.ListModulesRequest(module_type_filter=types_pb2.MODULE_TYPE_ALB), metadata=auth)
    check([m.instance_id for m in listed.modules] == ["py-alb-1"], f"listed {listed.modules}")
    check(listed.modules[0].current_connections == 2, "connections from the heartbeat")

    routed = stub.RouteRequest(
        nlb_pb2.RouteRequestRequest(route=types_pb2.Route(protocol=types_pb2.PROTOCOL_HTTP, source_pattern="www.py.example")),
        metadata=auth,
    )
    check(routed.routed and routed.target_address == "127.0.0.1:8080", f"routed {routed}")

    try:
        stub.UpdateRouting(
            nlb_pb2.UpdateRoutingRequest(routes=[types_pb2.Route(route_id="", destination_pattern="alb")]),
            metadata=auth,
        )
        check(False, "an empty route id must be refused")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"expected INVALID_ARGUMENT, got {error.code()}")
        check("route_id" in error.details(), error.details())

    updated = stub.UpdateNLBConfig(
        nlb_pb2.UpdateNLBConfigRequest(
            config=types_pb2.ConfigUpdate(config_type="balancing", config_data=b'{"strategy": "round_robin"}')
        ),
        metadata=auth,
    )
    check(updated.success, updated.message)
    config = stub.GetNLBConfig(nlb_pb2.GetNLBConfigRequest(config_type="balancing"), metadata=auth)
    check(json.loads(config.configs[0].config_data)["strategy"] == "round_robin", "config read back")

    status = stub.GetNLBStatus(nlb_pb2.GetNLBStatusRequest(include_modules=True), metadata=auth)
    check(status.registered_modules == 1 and status.modules_by_type["alb"] == 1, f"status {status}")

    stream = stub.StreamNLBMetrics(nlb_pb2.StreamNLBMetricsRequest(interval_seconds=1), metadata=auth)
    first = next(iter(stream))
    check(any(p.name == "nlb_registered_modules" for p in first.metrics), "streamed metrics")
    stream.cancel()

    print(json.dumps({"registered": registered.registration_id != "", "routed_to": routed.target_instance_id}))


if __name__ == "__main__":
    main()
