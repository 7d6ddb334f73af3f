from encinfer.cli import build_parser


def test_cli_lists_its_subcommands():
    help_text = build_parser().format_help()
    assert "probe" in help_text


def test_client_library_exports_its_main_classes():
    from encinfer.client import EncryptedClassifier, KeyStoreClient

    assert callable(EncryptedClassifier.predict) and callable(KeyStoreClient.put)
