from encinfer.cli import build_parser


def test_cli_lists_its_subcommands():
    help_text = build_parser().format_help()
    assert "probe" in help_text
