// A counter kept in the files archive, so every change is a signed archive entry.
const PATH = '/counter.json'

async function load () {
  try {
    return JSON.parse(await System.files.readFile(PATH)).value
  } catch (e) {
    if (e.name === 'NotFoundError') return 0
    throw e
  }
}

exports.init = async () => {
  await System.files.writeFile(PATH, JSON.stringify({ value: 0 }))
}

exports.increment = async () => {
  const value = (await load()) + 1
  await System.files.writeFile(PATH, JSON.stringify({ value, by: System.caller.id || null }))
  return value
}

exports.get = () => load()
