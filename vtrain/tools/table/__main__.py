from vtrain.tools.table.cli import main

main()
