/*
 * Compile check for the QuPath scripts (see stubs/README.md): compiles the QuPath API stubs, then each given
 * script with QuPath's default script imports, under this Groovy (2.4 in CI: syntax QuPath's Groovy 4 also
 * accepts). One JVM for all scripts; prints "QPB <json>" per script.
 *
 * usage: groovy -cp gson.jar:jts-core.jar:slf4j-api.jar compile_check.groovy STUBS_DIR WORK_DIR SCRIPT...
 */
import com.google.gson.Gson
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.control.Phases
import org.codehaus.groovy.control.customizers.ImportCustomizer

File stubsDir = new File(args[0])
File stubsOut = new File(args[1], 'stub-classes')
stubsOut.mkdirs()

CompilerConfiguration stubConfig = new CompilerConfiguration()
stubConfig.setTargetDirectory(stubsOut)
CompilationUnit stubs = new CompilationUnit(stubConfig, null, new GroovyClassLoader(this.class.classLoader))
stubsDir.listFiles().findAll { it.name.endsWith('.groovy') }.sort().each { stubs.addSource(it) }
stubs.compile(Phases.OUTPUT)

// What QuPath's script editor imports into every Groovy script (QPEx statics and common core classes).
ImportCustomizer qupathImports = new ImportCustomizer()
qupathImports.addStaticStars('qupath.lib.gui.scripting.QPEx')
qupathImports.addImports('qupath.lib.images.ImageData', 'qupath.lib.images.servers.ImageServer',
        'qupath.lib.objects.PathObject', 'qupath.lib.regions.RegionRequest', 'qupath.lib.regions.ImagePlane',
        'qupath.lib.roi.GeometryTools', 'qupath.lib.io.PathIO', 'qupath.lib.io.GsonTools',
        'qupath.lib.images.writers.TileExporter', 'qupath.lib.images.servers.LabeledImageServer',
        'qupath.lib.common.ColorTools', 'java.awt.image.BufferedImage')

for (String path : args[2..-1]) {
    File script = new File(path)
    CompilerConfiguration config = new CompilerConfiguration()
    config.setClasspathList([stubsOut.absolutePath])
    config.addCompilationCustomizers(qupathImports)
    GroovyClassLoader loader = new GroovyClassLoader(this.class.classLoader, config)
    CompilationUnit unit = new CompilationUnit(config, null, loader)
    unit.addSource(script)
    Map result = [check: 'compile', script: script.name, ok: true]
    try {
        unit.compile(Phases.CLASS_GENERATION)
        result.classes = unit.getClasses().size()
    } catch (Exception e) {
        result.ok = false
        result.error = e.getMessage()
    }
    println 'QPB ' + new Gson().toJson(result)
}
