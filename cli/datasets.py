"""``meshserve datasets``: create, upload, list, show, delete and stream datasets of a data worker."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from cli.endpoints import gateway_from_args
from mesh.cli_error import CliError
from mesh.server.app import DEFAULT_MAX_MESSAGE_BYTES
from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from registry.state_dir import add_state_dir_argument
from workers.data import wire
from workers.data.schema import Array

out = Console()

_SPLITS = {
    "train": pb.SPLIT_TRAIN,
    "validation": pb.SPLIT_VALIDATION,
    "test": pb.SPLIT_TEST,
    "all": pb.SPLIT_ALL,
}
_TASKS = {
    "none": pb.TASK_UNSPECIFIED,
    "classification": pb.TASK_CLASSIFICATION,
    "regression": pb.TASK_REGRESSION,
}


def _address(args: argparse.Namespace) -> str:
    """--address, else $MESHSERVE_GATEWAY, else the running `up`'s gateway (it routes
    DataService), else 127.0.0.1:8080."""
    return gateway_from_args(args, args.address)


def _stub(address: str) -> tuple[grpc.Channel, data_pb2_grpc.DataServiceStub]:
    limit = DEFAULT_MAX_MESSAGE_BYTES
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
    )
    return channel, data_pb2_grpc.DataServiceStub(channel)


def _split_spec(args: argparse.Namespace) -> pb.SplitSpec:
    return pb.SplitSpec(
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        seed=args.split_seed,
    )


def _schema_text(schema: pb.Schema) -> str:
    def cols(specs: Any) -> str:
        return ", ".join(
            f"{s.name}:{pb.DataType.Name(s.data_type).removeprefix('DATA_TYPE_')}{list(s.shape)}"
            for s in specs
        )

    text = cols(schema.features)
    if schema.labels:
        text += f" → {cols(schema.labels)}"
    return text


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _print_datasets(datasets: Any, title: str) -> None:
    table = Table(title=title, header_style="bold")
    for column in ("name", "version", "examples", "train/val/test", "schema", "size", "created"):
        table.add_column(column)
    for d in datasets:
        table.add_row(
            d.name,
            d.version,
            str(d.num_examples),
            f"{d.num_train}/{d.num_validation}/{d.num_test}",
            _schema_text(d.schema),
            _human_bytes(d.size_bytes),
            d.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


def _show(d: pb.Dataset) -> None:
    _print_datasets([d], f"dataset {d.name} version {d.version}")
    out.print(f"source: {d.source}   sha256: {d.sha256}", highlight=False)
    if d.description:
        out.print(f"description: {d.description}", highlight=False)


def _create(args: argparse.Namespace) -> int:
    request = pb.CreateBuiltinDatasetRequest(
        name=args.name, version=args.version, seed=args.seed, split=_split_spec(args)
    )
    if args.source == "blobs":
        request.blobs.CopyFrom(
            pb.BlobsSource(
                num_examples=args.num_examples,
                num_classes=args.num_classes,
                num_features=args.num_features,
                cluster_std=args.cluster_std,
            )
        )
    elif args.source == "spirals":
        request.spirals.CopyFrom(
            pb.SpiralsSource(num_examples=args.num_examples, num_classes=args.num_classes)
        )
        if args.noise is not None:
            request.spirals.noise = args.noise
    elif args.source == "regression":
        request.regression.CopyFrom(
            pb.RegressionSource(num_examples=args.num_examples, num_features=args.num_features)
        )
        if args.noise is not None:
            request.regression.noise = args.noise
    else:
        request.digits.SetInParent()
    channel, stub = _stub(_address(args))
    with channel:
        _show(stub.CreateBuiltinDataset(request))
    return 0


def _load_npz(path: Path, names: list[str]) -> dict[str, Array]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [n for n in names if n not in archive.files]
            if missing:
                raise CliError(
                    f"{path} has no array {missing[0]!r} (it has: {', '.join(archive.files)})"
                )
            return {n: np.asarray(archive[n]) for n in names}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from exc


def _upload(args: argparse.Namespace) -> int:
    features = list(dict.fromkeys(args.features))
    labels = list(dict.fromkeys(args.labels or []))
    arrays = _load_npz(Path(args.file), features + labels)
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CliError(f"arrays must have the same number of examples, got {counts}")
    task = _TASKS[args.task]
    num_classes = args.num_classes
    if task == pb.TASK_CLASSIFICATION and num_classes == 0 and labels:
        # The common case: classes are 0..max; say what was assumed.
        num_classes = int(max(int(arrays[n].max()) for n in labels)) + 1
        out.print(f"num_classes not given: using {num_classes} (largest label + 1)")

    def spec(name: str) -> pb.TensorSpec:
        tensor = wire.tensor_from_array(name, arrays[name][:0])
        return pb.TensorSpec(name=name, data_type=tensor.data_type, shape=list(tensor.shape[1:]))

    header = pb.DatasetHeader(
        name=args.name,
        version=args.version,
        description=args.description,
        split=_split_spec(args),
        schema=pb.Schema(
            features=[spec(n) for n in features],
            labels=[spec(n) for n in labels],
            task=task,
            num_classes=num_classes,
        ),
    )
    requests: Iterator[pb.CreateDatasetRequest] = wire.upload_requests(
        header, arrays, records_per_message=args.records_per_message
    )
    channel, stub = _stub(_address(args))
    with channel:
        _show(stub.CreateDataset(requests))
    return 0


def _list(args: argparse.Namespace) -> int:
    channel, stub = _stub(_address(args))
    with channel:
        reply = stub.ListDatasets(pb.ListDatasetsRequest(name=args.name))
    _print_datasets(reply.datasets, f"datasets on {_address(args)}")
    return 0


def _get(args: argparse.Namespace) -> int:
    channel, stub = _stub(_address(args))
    with channel:
        _show(stub.GetDataset(pb.GetDatasetRequest(name=args.name, version=args.version)))
    return 0


def _delete(args: argparse.Namespace) -> int:
    channel, stub = _stub(_address(args))
    with channel:
        stub.DeleteDataset(pb.DeleteDatasetRequest(name=args.name, version=args.version))
    out.print(f"deleted {args.name} version {args.version}", highlight=False)
    return 0


def _stream(args: argparse.Namespace) -> int:
    request = pb.StreamBatchesRequest(
        dataset=args.name,
        version=args.version,
        split=_SPLITS[args.split],
        batch_size=args.batch_size,
        shuffle=args.shuffle,
        seed=args.seed,
        epoch=args.epoch,
        standardize=args.standardize,
        drop_last=args.drop_last,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
    )
    table = Table(title=f"{args.name} · {args.split} · epoch {args.epoch}", header_style="bold")
    for column in ("batch", "size", "tensors", "first examples"):
        table.add_column(column)
    batches = examples = 0
    channel, stub = _stub(_address(args))
    with channel:
        for batch in stub.StreamBatches(request):
            batches += 1
            examples += batch.size
            if batches <= args.show:
                arrays = wire.arrays_from_batch(batch)
                shapes = ", ".join(f"{k}{list(a.shape)} {a.dtype}" for k, a in arrays.items())
                ids = ", ".join(map(str, batch.example_ids[:5]))
                table.add_row(str(batch.index), str(batch.size), shapes, ids)
    out.print(table)
    out.print(f"{batches} batches, {examples} examples", highlight=False)
    return 0


def _add_split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--validation-fraction", type=float, default=0.0, help="default 0.2")
    parser.add_argument("--test-fraction", type=float, default=0.0)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split assignment")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("datasets", help="manage the datasets of a data worker")
    parser.add_argument(
        "--address",
        default=None,
        help="data worker or gateway (default: the running up's gateway)",
    )
    add_state_dir_argument(parser)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        # Accepted after the action too: `meshserve datasets list --address A`.
        p.add_argument("--address", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add_state_dir_argument(p, hidden=True)
        return p

    create = add("create", "create a dataset from a built-in generator")
    create.add_argument("name")
    create.add_argument(
        "--source", choices=["blobs", "spirals", "regression", "digits"], required=True
    )
    create.add_argument("--version", default="", help="default: next integer")
    create.add_argument("--num-examples", type=int, default=1000)
    create.add_argument("--num-classes", type=int, default=0, help="0: the source's default")
    create.add_argument("--num-features", type=int, default=0, help="0: the source's default")
    create.add_argument("--cluster-std", type=float, default=0.0, help="blobs; 0: 1.0")
    create.add_argument("--noise", type=float, default=None, help="spirals/regression noise")
    create.add_argument("--seed", type=int, default=0, help="generator seed")
    _add_split_options(create)
    create.set_defaults(handler=_create)

    upload = add("upload", "upload arrays from a .npz file")
    upload.add_argument("name")
    upload.add_argument("file", help=".npz file (numpy.savez) holding the arrays")
    upload.add_argument(
        "--features", action="append", required=True, help="array name of a feature (repeatable)"
    )
    upload.add_argument("--labels", action="append", help="array name of a label (repeatable)")
    upload.add_argument("--task", choices=sorted(_TASKS), default="none")
    upload.add_argument(
        "--num-classes", type=int, default=0, help="classification; 0: largest label + 1"
    )
    upload.add_argument("--version", default="", help="default: next integer")
    upload.add_argument("--description", default="")
    upload.add_argument(
        "--records-per-message", type=int, default=None, help="default: about 4 MiB per message"
    )
    _add_split_options(upload)
    upload.set_defaults(handler=_upload)

    listing = add("list", "list datasets as a table")
    listing.add_argument("--name", default="", help="only this name")
    listing.set_defaults(handler=_list)

    get = add("get", "show one dataset version")
    get.add_argument("name")
    get.add_argument("--version", default="", help="default: latest")
    get.set_defaults(handler=_get)

    delete = add("delete", "delete one dataset version")
    delete.add_argument("name")
    delete.add_argument("--version", required=True)
    delete.set_defaults(handler=_delete)

    stream = add("stream", "stream one epoch of a split and summarise its batches")
    stream.add_argument("name")
    stream.add_argument("--version", default="", help="default: latest")
    stream.add_argument("--split", choices=sorted(_SPLITS), default="train")
    stream.add_argument("--batch-size", type=int, default=32)
    stream.add_argument("--shuffle", action="store_true")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--epoch", type=int, default=0)
    stream.add_argument("--standardize", action="store_true")
    stream.add_argument("--drop-last", action="store_true")
    stream.add_argument("--num-shards", type=int, default=1)
    stream.add_argument("--shard-index", type=int, default=0)
    stream.add_argument("--show", type=int, default=10, help="batches to show in the table")
    stream.set_defaults(handler=_stream)
