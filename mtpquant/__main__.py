from mtpquant.cli import main

main()
