// A small file service: anyone can read, write, list and remove files.
exports.writeFile = async (path, content) => {
  await System.files.writeFile(path, content)
  return (await System.files.stat(path)).size
}

exports.readFile = (path) => System.files.readFile(path)

exports.readdir = (path = '/') => System.files.readdir(path)

exports.mkdir = (path) => System.files.mkdir(path)

exports.remove = async (path) => {
  const st = await System.files.stat(path)
  if (st.isDirectory()) await System.files.rmdir(path, { recursive: true })
  else await System.files.unlink(path)
}

exports.history = () => System.files.history()
