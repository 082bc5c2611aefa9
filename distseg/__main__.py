from distseg.cli import main

if __name__ == "__main__":  # not in a spawned child process, which imports this module as __mp_main__
    main()
