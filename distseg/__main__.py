from distseg.cli import main

main()
