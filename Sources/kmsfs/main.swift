import ArgumentParser
KMSFS.main()
