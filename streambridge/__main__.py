from streambridge.cli import main

if __name__ == "__main__":  # not when a spawned process (the batch lane) imports it
    main()
