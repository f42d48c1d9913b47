"""`shardwise train`: every check made before any rank is spawned, then the training run on every rank."""

from __future__ import annotations

import logging

from ..io.publish import check_target
from ..launch import launch
from ..plan.spec import load_spec
from ..words import plural
from .args import _checkpoint_dir, _layout, _plan_everywhere, _provide, _report, _world

log = logging.getLogger("shardwise")


def _check_train(args):
    """Every mistake a train job could make, found before any rank is spawned; the token stream it trains on, and
    with --resume the saved record."""
    from ..train.data import TokenStream, check_batching, thin_text, tokenize_file
    from ..train.run import check_log, same_directory
    from ..train.state import Record, base_dtype
    from ..train.step import TRAINABLE

    if args.pp > 1:
        raise ValueError(f"--pp {args.pp}: training over pipeline stages is not built yet; use --pp 1")
    if args.provider not in TRAINABLE:
        raise ValueError(f"--provider {args.provider}: training runs on {' or '.join(TRAINABLE)}")
    if args.series:
        raise ValueError("--series declares layers of --provider series, which training does not run on")
    _provide(args)
    spec = _plan_everywhere(args.checkpoint, _layout(args), args.provider)
    if args.resume:
        _checkpoint_dir(args.resume, "--resume")
    in_place = same_directory(args.resume, args.save)  # each save replaces RUN, vetted below as this run's
    others = [args.resume] if args.resume and not in_place else []
    check_target(args.save, args.overwrite or in_place, [args.checkpoint, *others])
    if args.log:
        check_log(args.log, args.checkpoint)
    check_batching(args.batch, args.dp, args.accumulate)
    ids = tokenize_file(args.checkpoint, args.data)
    stream = TokenStream.from_ids(ids, args.seq, args.batch, args.seed, args.data)
    for warning in thin_text(args.data, len(ids), args.seq, args.batch):
        log.warning("%s", warning)
    if int(stream.windows.max()) >= spec.vocab:
        raise ValueError(f"{args.data}: token id {int(stream.windows.max())}, but the model's vocabulary has "
                         f"{spec.vocab} (tokenizer and model disagree)")
    if args.resume:
        shapes = {name: info.shape for name, info in spec.tensors().items()}
        saved = {name: info.shape for name, info in load_spec(args.resume).tensors().items()}
        if saved != shapes:
            raise ValueError(f"--resume {args.resume}: its config.json describes another model than "
                             f"{args.checkpoint}'s ({len(saved)} tensors against {len(shapes)}, or other shapes)")
        record = Record.read(args.resume)
        record.check_resumable(args.resume, stream, args.steps)
        return stream, record
    base_dtype(args.checkpoint)  # the dtype the saves record (a training checkpoint's, from its record: vetted)
    return stream, None


def cmd_train(args) -> None:
    from ..train.run import TrainArgs, settings, train_rank

    stream, record = _check_train(args)
    job = TrainArgs(args.checkpoint, _layout(args), _provide(args), stream, args.steps, args.lr, args.save,
                    args.warmup, args.schedule, args.weight_decay, args.clip or None, args.accumulate,
                    args.save_every, args.overwrite, args.log, args.resume)
    if record is not None and record.changed(settings(job)):
        log.warning("--resume %s: this run changes %s (steps %d on follow this run's settings, not the saved run's)",
                    args.resume, ", ".join(record.changed(settings(job))), record.step + 1)
    result = launch(train_rank, _world(args), job)
    _report(f"trained steps {result['first_step']}..{result['steps']} on {plural(len(stream.windows), 'window')} of "
            f"{args.seq} tokens ({_layout(args)}, {args.provider}): loss {result['first_loss']:.4f} -> "
            f"{result['last_loss']:.4f}; saved {args.save}")
