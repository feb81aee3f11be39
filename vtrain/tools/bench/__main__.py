from vtrain.tools.bench.cli import main

main()
