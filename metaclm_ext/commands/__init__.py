"""The `metaclm` subcommands, one module each: ``add_parser(subparsers)`` declares its flags and ``main(args)``
turns them into one library call and prints the result. The library modules know nothing of argparse."""
