"""The Beam pipeline options of ours, read by Beam's own option parsing
(`--pipeline_options='--user_groups=8'`). A module of its own, light to import: the command
line checks the options before TensorFlow loads."""

from apache_beam.options.pipeline_options import PipelineOptions


class ConversionOptions(PipelineOptions):
    """`--user_groups`: see `beam_pipeline.user_groups`."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--user_groups", type=int, default=None,
            help="ifa_tf: the number of groups of users the grouping by user runs in, one "
                 "after another (each a step of its own; the audit's score ranges likewise). "
                 "Default: on the DirectRunner, whose workers are sent their whole share of "
                 "a step's input at once, one per 32 MiB of log for each worker; one on "
                 "other runners, which stream it.")
